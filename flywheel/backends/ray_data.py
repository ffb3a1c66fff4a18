"""`generate.backend: ray`: a stage's batches run as one Ray Data job over a pool of actors, each holding the model.

    backend = make_backend(cfg.generate, model_path, device, ray=cfg.ray)    # what stage.backend_for does
    for index, outs in backend.run(sample, [(0, batch0), (1, batch1)]):     # as each batch finishes, in any order
        ...                                                                  # sample(engine, index, batch) -> outs
    outs = backend.generate(prompts, SamplingParams(n=4), seed=123, chat=True)   # one call, on the backend's own actor

The driver joins a cluster (`ray.address`, else the RAY_ADDRESS environment variable, else a local cluster started
in this process, sized for the pool). `run` makes a dataset of one row per batch (`ray.data.from_items`, one block
each) and maps it with `BatchRunner`: `ray.actors` actors, each reserving `ray.cpus_per_actor` CPUs and
`ray.gpus_per_actor` GPUs, each loading its engine once. Results stream back as they finish; each carries its batch
index, so the stage commits it under the right ids and seed (flywheel.stage.run_batches).

The engine (`ray.engine`) is one of the in-process backends, run inside the actor:

- `transformers`: a TransformersBackend on the model's folder (on CUDA when the actor has a GPU), with torch threads
  = int(ray.cpus_per_actor), set on purpose: matmul results can depend on the thread count, so in-process and Ray
  give identical outputs when the thread counts match (run.threads there, ray.cpus_per_actor here);
- `vllm`: a VLLMBackend with generate.vllm's settings, for GPU nodes (`ray.gpus_per_actor` > 0). It cannot run on
  this CPU-only machine and is not tested here.

What runs on an actor is a callable `fn(engine, index, batch) -> result`, shipped with cloudpickle (`ship`): the
stage's own code (`engine.generate(...)`, `judge.verdicts(...)`) on the actor's local engine. Workers never open the
registry: `ship` refuses anything that carries a Registry or a DuckDB connection. Every node needs flywheel
installed (the same version), since the callable's module-level functions are pickled by reference.

Why not `ray.data.llm.build_llm_processor`: it maps prompt rows through vLLM. Our unit of work is a whole fixed batch
with its own seed (so a resumed stage samples exactly what an uninterrupted one would), followed by our own parsing
(the judge's verdicts); one row per batch with our callable keeps both, on either engine.

`ray` is imported only when this backend is made (`import_ray`), so the library imports without it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from .. import timing
from ..config import ConfigError, RayConfig, VLLMBackendConfig
from .generation import GenerationBackend

log = logging.getLogger("flywheel")

PROBE_TIMEOUT_S = 5.0  # how long the cluster's address may take to accept a connection before it is a ConfigError

# What a batch runs on an actor: (the actor's engine, the batch's index, the batch) -> what the stage commits.
BatchFn = Callable[[GenerationBackend, int, Any], Any]


def import_ray():
    """The ray module (with ray.data), or a ConfigError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ConfigError(f"generate.backend=ray needs the ray package with Ray Data, which cannot be imported here "
                          f'({e}): pip install -e ".[ray]"') from None
    return ray


def cluster_address(cfg: RayConfig) -> tuple[str | None, str]:
    """(the address to join or None for a local cluster, the setting it came from: ray.address or RAY_ADDRESS)."""
    if cfg.address:
        return cfg.address, "ray.address"
    return os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"


def probe(address: str, setting: str) -> None:
    """A ConfigError naming `setting` when nothing accepts a connection at `address` within PROBE_TIMEOUT_S (ray.init
    itself retries for a long time). 'auto' and 'local' are left to ray.init."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{setting}={address!r} is not host:port (or ray://host:port, or auto)")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"{setting}={address}: no Ray cluster answers there ({e}); start one (ray start --head) "
                          f"or fix {setting}") from None


def connect(cfg: RayConfig) -> bool:
    """Join the cluster of `cfg` (see `cluster_address`), or start a local one sized for the pool. Returns whether
    this call connected (False: the process was connected already, and that connection is used). A pool that cannot
    fit on the cluster is a ConfigError here, before any work."""
    ray = import_ray()
    joined = False
    if not ray.is_initialized():
        address, setting = cluster_address(cfg)
        if address:
            probe(address, setting)
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except Exception as e:  # ConnectionError, a version mismatch, ...
                raise ConfigError(f"{setting}={address}: cannot join the Ray cluster: {type(e).__name__}: {e}") from None
        else:
            ray.init(num_cpus=max(1, math.ceil(cfg.actors * cfg.cpus_per_actor)), include_dashboard=False,
                     logging_level=logging.WARNING)
        joined = True
    have = ray.cluster_resources()
    for kind, each, setting in (("CPU", cfg.cpus_per_actor, "ray.cpus_per_actor"),
                                ("GPU", cfg.gpus_per_actor, "ray.gpus_per_actor")):
        if each and cfg.actors * each > have.get(kind, 0):
            if joined:
                ray.shutdown()
            raise ConfigError(f"ray.actors={cfg.actors} x {setting}={each:g} needs {cfg.actors * each:g} {kind}s; the "
                              f"cluster has {have.get(kind, 0):g}: lower ray.actors or {setting}")
    return joined


def ship(obj: Any) -> bytes:
    """`obj` (a batch, or the callable a batch runs) pickled for the actors; a ValueError if it carries a Registry or
    a DuckDB connection, anywhere inside (a closure's variable, a default argument, a list): workers never open the
    registry, the driver commits what they return."""
    import io

    import duckdb
    from ray import cloudpickle

    from ..registry import Registry

    class Shipper(cloudpickle.Pickler):
        def reducer_override(self, o):
            if isinstance(o, (Registry, duckdb.DuckDBPyConnection)):
                raise ValueError(f"{obj!r} carries a {type(o).__name__}, which must not go to a Ray worker: workers "
                                 "never open the registry; give the batch its rows and commit results on the driver")
            return super().reducer_override(o)

    buffer = io.BytesIO()
    Shipper(buffer).dump(obj)
    return buffer.getvalue()


class BatchRunner:
    """One actor of the pool: loads its engine once, then runs the shipped callable on each row's batch."""

    def __init__(self, engine: str, model_path: str, device: str, threads: int, vllm: dict, fn: bytes):
        import pickle

        import torch

        from .generation import TransformersBackend, VLLMBackend

        torch.set_num_threads(threads)
        if engine == "transformers":
            self.engine = TransformersBackend(model_path, device)
        else:
            self.engine = VLLMBackend(model_path, VLLMBackendConfig(**vllm))
        self.fn = pickle.loads(fn)

    def __call__(self, row: dict) -> dict:
        import pickle

        import numpy as np

        index = int(row["index"][0])
        result = self.fn(self.engine, index, pickle.loads(row["batch"][0]))
        return {"index": np.array([index]), "result": np.array([pickle.dumps(result)], dtype=object)}


def _call(engine, index, fn_and_batch):
    """What the single-call actor runs: the (callable, batch) pair it is sent, on its engine."""
    fn, batch = fn_and_batch
    return fn(engine, index, batch)


def _generate(engine, index, prompts, *, params, seed, chat):
    return engine.generate(prompts, params, seed=seed, chat=chat)


def _choice_probs(engine, index, prompts, *, prefix, choices, batch_size):
    return engine.choice_probs(prompts, prefix, choices, batch_size=batch_size)


class RayBackend(GenerationBackend):
    """Batches on a Ray cluster's actor pool (see the module's doc). `generate` and `choice_probs` work too, as single
    calls on one actor kept by the backend (started on the first call, stopped when a pool runs or on close)."""

    name = "ray"

    def __init__(self, model_path: str, cfg: RayConfig, vllm: VLLMBackendConfig | None = None):
        self.cfg = cfg
        self._actor = None  # the single-call actor (`_one`), started on first use
        self._owns_connection = connect(cfg)
        self._engine = dict(engine=cfg.engine, model_path=str(model_path),
                            device="cuda" if cfg.gpus_per_actor > 0 else "cpu",
                            threads=max(1, int(cfg.cpus_per_actor)),
                            vllm=(vllm or VLLMBackendConfig()).model_dump())

    def __repr__(self) -> str:
        return f"RayBackend(engine={self.cfg.engine!r}, model={self._engine['model_path']!r}, actors={self.cfg.actors})"

    def run(self, fn: BatchFn, jobs: list[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        """(index, fn(engine, index, batch)) for each (index, batch) of `jobs`, all submitted at once to a pool of
        up to ray.actors actors and yielded as they finish (in any order). The driver's wait counts as compute time
        (flywheel.timing)."""
        import pickle

        import ray.data

        if not jobs:
            return
        self._stop_actor()  # the single-call actor's CPUs go to the pool
        runner = ship(fn)  # before any work: refused here if it carries the registry
        rows = [{"index": index, "batch": ship(batch)} for index, batch in jobs]
        ray.data.DataContext.get_current().enable_progress_bars = False  # the stage shows its own
        results = iter(ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            BatchRunner, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(self.cfg.actors, len(rows))),
            num_cpus=self.cfg.cpus_per_actor, num_gpus=self.cfg.gpus_per_actor,
            fn_constructor_kwargs={**self._engine, "fn": runner},
        ).iter_rows())
        while True:
            with timing.compute():
                row = next(results, None)
            if row is None:
                return
            yield int(row["index"]), pickle.loads(row["result"])

    def _one(self, fn: BatchFn, batch: Any) -> Any:
        """One call on this backend's own actor (a `BatchRunner` started on the first call and kept, so a stage of
        many single calls, such as self-instruct, loads the model once). `run` stops it first: its CPUs go to the
        pool."""
        import pickle

        import ray

        if self._actor is None:
            runner = ray.remote(num_cpus=self.cfg.cpus_per_actor, num_gpus=self.cfg.gpus_per_actor)(BatchRunner)
            self._actor = runner.remote(**self._engine, fn=ship(_call))
        row = {"index": [0], "batch": [ship((fn, batch))]}
        with timing.compute():
            out = ray.get(self._actor.__call__.remote(row))
        return pickle.loads(out["result"][0])

    def _stop_actor(self) -> None:
        if self._actor is not None:
            import ray

            ray.kill(self._actor)
            self._actor = None

    def generate(self, prompts, params, *, seed, chat):
        return self._one(partial(_generate, params=params, seed=seed, chat=chat), list(prompts))

    def choice_probs(self, prompts, prefix, choices, *, batch_size):
        if self.cfg.engine != "transformers":
            return super().choice_probs(prompts, prefix, choices, batch_size=batch_size)
        return self._one(partial(_choice_probs, prefix=prefix, choices=list(choices), batch_size=batch_size),
                         list(prompts))

    def close(self) -> None:
        """Stop the single-call actor; leave the cluster if this backend joined it (a local cluster it started stops
        with it)."""
        self._stop_actor()
        if self._owns_connection:
            import ray

            ray.shutdown()
            self._owns_connection = False
