"""`generate.backend: ray` on a real Ray cluster (`ray start --head` on 127.0.0.1, 2 CPUs), a real DuckDB registry and
a random tiny model: the generate and judge stages (judge.mode sample and prob) give exactly the rows of the
in-process transformers backend, the generate stage even when its driver is killed with SIGKILL mid-stage and resumed
in another process; bad settings fail before any work, naming the setting; nothing shipped to a worker carries the
registry; no Ray process is left behind.

Starting a pool is slow on a loaded 2-core machine (its actors import torch and load the model): every Ray stage
costs ~30-60 s here, so the module runs four, once, in one fixture."""

import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import psutil
import pytest

from flywheel.backends import (RayBackend, SamplingParams, TransformersBackend, check_backend, make_backend,
                               release_backends)
from flywheel.backends.ray_data import ship
from flywheel.config import ConfigError, load_config
from flywheel.registry import Registry
from flywheel.stage import stage_run_id
from flywheel.stages.generate import generate
from flywheel.stages.judge import check_judge, judge
from tests.helpers.processes import kill_at_marker
from tests.helpers.ray_cluster import free_port, ray_head
from tests.helpers.registry import insert_rows, prompt_row

pytestmark = pytest.mark.slow  # a real Ray cluster, actors loading models

REPO = Path(__file__).resolve().parents[1]
PROMPTS = 24  # generate: 12 batches of 2 prompts x 2 candidates, 48 tokens each (long enough to kill mid-stage)
SETTINGS = ["run.device=cpu", "run.threads=1", "generate.n=2", "generate.max_new_tokens=48", "generate.batch_size=2",
            "judge.samples=2", "judge.max_new_tokens=8", "judge.batch_size=8", "ray.actors=2", "ray.cpus_per_actor=1"]


@pytest.fixture(scope="module")
def cluster():
    """A 2-CPU Ray head for the module; on the way out this process leaves it, then no process of it is left."""
    import ray

    with ray_head(num_cpus=2) as address:
        try:
            yield address
        finally:
            release_backends()
            ray.shutdown()  # before the head goes: a driver whose cluster vanished aborts after 60 s
    time.sleep(1)
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"]) if address in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes of the test cluster left behind: {left}"


@pytest.fixture(autouse=True)
def _disconnected():
    """Each test ends with this process out of the cluster (release_backends closes a RayBackend, which leaves it)."""
    import ray

    yield
    release_backends()
    assert not ray.is_initialized(), "a RayBackend stayed connected after release_backends()"


def _registry(root: Path, model: Path) -> None:
    """Model "m" (the session's random tiny Llama) and PROMPTS kept prompts of self-instruct stage "si"."""
    with Registry(root) as reg:
        reg.register_model(model_id="m", run_id="r", name="m", kind="sft", iteration=0, parent_id=None,
                           path=str(model), stage_run_id="sft", config_hash="h", metrics={})
        insert_rows(reg, "prompts", [prompt_row(f"p{i:02d}", f"Name a colour, number {i}.", "si")
                                     for i in range(PROMPTS)])


def _config(root: Path, *overrides: str):
    return load_config(None, [f"registry.root={root}", *SETTINGS, *overrides])


def _rows(root: Path, table: str, sid: str, cols: str) -> list[tuple]:
    key = "candidate_id" if table == "candidates" else "judgment_id"
    with Registry(root) as reg:
        return reg.con.execute(f"SELECT {cols} FROM {table} WHERE stage_run_id = ? ORDER BY {key}", [sid]).fetchall()


CANDIDATE = "candidate_id, prompt_id, sample_index, text, num_tokens, finish_reason, seed, model_id, sampling"
JUDGMENT = "judgment_id, candidate_id, sample_index, raw_text, score, parse_error, sampling"


CHILD = """
import logging, sys
from flywheel.config import load_config
from flywheel.stages.generate import generate
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
generate(load_config(None, sys.argv[1:]), "r", 1, "m", "si")
"""


def kill_after_first_commit(overrides: list[str]) -> None:
    """Run the generate stage in a real subprocess (its own Ray driver) and SIGKILL it once it logs a committed batch."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, *overrides], stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, cwd=REPO)
    kill_at_marker(child, "generate: committed batch")


@pytest.fixture(scope="module")
def runs(cluster, tiny_model_path, tmp_path_factory, one_torch_thread):
    """One iteration's generate, judge (mode sample) and judge (mode prob) stages, in-process
    (generate.backend=transformers) and on the cluster (generate.backend=ray). On the cluster the generate stage's
    driver, a subprocess, is killed with SIGKILL after its first committed batch, and the stage resumes here (a new
    process); what it left at the kill is recorded. Each Ray stage costs ~30-60 s on a loaded 2-core machine (its
    actors start and load the model), so the module runs these four once."""
    base = tmp_path_factory.mktemp("ray-runs")
    here, there = base / "inprocess", base / "ray"
    found = {}
    _registry(here, tiny_model_path)
    gen = generate(_config(here), "r", 1, "m", "si")
    found["inprocess"] = {"generate": gen,
                          "sample": judge(_config(here), "r", 1, "m", gen.stage_run_id),
                          "prob": judge(_config(here, "judge.mode=prob"), "r", 1, "m", gen.stage_run_id)}
    release_backends()

    on_ray = ["generate.backend=ray", f"ray.address={cluster}"]
    _registry(there, tiny_model_path)
    kill_after_first_commit([f"registry.root={there}", *SETTINGS, *on_ray])
    with Registry(there) as reg:
        found["at_kill"] = {"candidates": reg.scalar("SELECT count(*) FROM candidates"),
                            "status": reg.scalar("SELECT status FROM stage_runs WHERE stage = 'generate'")}
    gen = generate(_config(there, *on_ray), "r", 1, "m", "si")  # resumed
    found["ray"] = {"generate": gen,
                    "sample": judge(_config(there, *on_ray), "r", 1, "m", gen.stage_run_id),
                    "prob": judge(_config(there, *on_ray, "judge.mode=prob"), "r", 1, "m", gen.stage_run_id)}
    release_backends()
    return {"root": base, **found}


# --- the same rows as in-process, through a kill -9 of the driver -----------------------------------------------------
def test_a_killed_ray_generate_stage_resumes_to_the_in_process_candidates(runs):
    """The uninterrupted run is the in-process one (the same stage id, seeds and so candidates): the Ray stage,
    killed mid-way and resumed in another process, ends with exactly its rows, no key twice."""
    assert 0 < runs["at_kill"]["candidates"] < PROMPTS * 2, runs["at_kill"]  # killed mid-stage
    assert runs["at_kill"]["candidates"] % 4 == 0  # whole batches (2 prompts x 2 candidates) only
    assert runs["at_kill"]["status"] == "running"  # nothing recorded its end
    here, there = runs["inprocess"]["generate"], runs["ray"]["generate"]
    assert there.stage_run_id == here.stage_run_id and not there.skipped  # where it ran is not in the id
    sid = here.stage_run_id
    got = _rows(runs["root"] / "ray", "candidates", sid, CANDIDATE)
    assert len(got) == PROMPTS * 2
    assert got == _rows(runs["root"] / "inprocess", "candidates", sid, CANDIDATE)  # texts, seeds, ids
    assert len({c[6] for c in got}) == PROMPTS // 2  # a seed per batch
    assert len({c[3] for c in got}) > PROMPTS  # sampled texts, not one repeated
    with Registry(runs["root"] / "ray") as reg:
        assert reg.rows("SELECT DISTINCT backend FROM candidates") == [{"backend": "ray"}]
        assert reg.scalar("SELECT count(DISTINCT candidate_id) FROM candidates") == PROMPTS * 2  # no key twice
        assert reg.scalar("SELECT status FROM stage_runs WHERE stage_run_id = ?", [sid]) == "done"
        assert reg.scalar("SELECT count(*) FROM dataset_versions WHERE stage_run_id = ?", [sid]) == 1


def test_the_judge_on_ray_gives_the_in_process_verdicts_in_sample_and_prob_mode(runs):
    for mode, per_candidate in (("sample", 2), ("prob", 1)):
        here, there = runs["inprocess"][mode], runs["ray"][mode]
        assert there.stage_run_id == here.stage_run_id and not there.skipped
        got = _rows(runs["root"] / "ray", "judgments", here.stage_run_id, JUDGMENT)
        assert len(got) == PROMPTS * 2 * per_candidate
        assert got == _rows(runs["root"] / "inprocess", "judgments", here.stage_run_id, JUDGMENT), mode
    prob = _rows(runs["root"] / "ray", "judgments", runs["ray"]["prob"].stage_run_id, JUDGMENT)
    assert {r[3][:9] for r in prob} == {'{"probs":'}  # the probabilities, from choice_probs on the actors


def test_stage_ids_of_existing_configs_do_not_change(tmp_path):
    """generate.backend=ray hashes its engine's name: the in-process backend's id, which is what it always was."""
    plain = load_config(None, [])
    section = plain.generate.model_dump(mode="json", exclude={"anchor_n"})
    old = stage_run_id("generate", {"model": "m", "prompts": "si-x", "cfg": section, "seed": 0})
    for overrides in ([], ["generate.backend=ray"], ["generate.backend=ray", "ray.actors=5", "ray.address=h:1"]):
        cfg = load_config(None, [f"registry.root={tmp_path}", *overrides])
        assert generate(cfg, "r", 1, "m", "si-x").stage_run_id == old  # no prompts there: nothing loads
    vllm = load_config(None, [f"registry.root={tmp_path}", "generate.backend=vllm"])
    on_ray = load_config(None, [f"registry.root={tmp_path}", "generate.backend=ray", "ray.engine=vllm"])
    assert generate(on_ray, "r", 1, "m", "si-y").stage_run_id == generate(vllm, "r", 1, "m", "si-y").stage_run_id


# --- bad settings fail before work; the registry never goes to a worker -----------------------------------------------
def test_an_address_where_nothing_listens_is_named_within_seconds(tmp_path, tiny_model_path, monkeypatch):
    _registry(tmp_path, tiny_model_path)
    dead = f"127.0.0.1:{free_port()}"
    cfg = _config(tmp_path, "generate.backend=ray", f"ray.address={dead}")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"ray\.address={dead}: no Ray cluster answers there"):
        check_backend(cfg.generate, cfg.ray)  # the run's preflight
    with pytest.raises(ConfigError, match=rf"ray\.address={dead}: no Ray cluster answers there"):
        generate(cfg, "r", 1, "m", "si")
    assert time.perf_counter() - t0 < 30
    with Registry(tmp_path) as reg:
        assert reg.scalar("SELECT count(*) FROM candidates") == 0
    monkeypatch.setenv("RAY_ADDRESS", dead)  # no ray.address: the environment's, named as such
    with pytest.raises(ConfigError, match=rf"RAY_ADDRESS={dead}: no Ray cluster answers there"):
        check_backend(_config(tmp_path, "generate.backend=ray").generate, _config(tmp_path).ray)
    with pytest.raises(ConfigError, match=r"ray\.address='nowhere' is not host:port"):
        check_backend(cfg.generate, _config(tmp_path, "ray.address=nowhere").ray)


def test_a_pool_larger_than_the_cluster_and_engines_that_cannot_run_are_refused(cluster, tiny_model_path, tmp_path):
    cfg = _config(tmp_path, "generate.backend=ray", f"ray.address={cluster}", "ray.actors=3")
    with pytest.raises(ConfigError, match=r"ray\.actors=3 x ray\.cpus_per_actor=1 needs 3 CPUs; the cluster has 2"):
        make_backend(cfg.generate, str(tiny_model_path), "cpu", ray=cfg.ray)
    with pytest.raises(ValueError, match=r"generate\.backend=ray needs the config's ray section"):
        make_backend(cfg.generate, str(tiny_model_path), "cpu")
    vllm = _config(tmp_path, "generate.backend=ray", f"ray.address={cluster}", "ray.engine=vllm")
    with pytest.raises(ConfigError, match=r"generate\.backend=vllm needs the vllm package"):
        check_backend(vllm.generate, vllm.ray)  # this machine has no vllm
    with pytest.raises(ConfigError, match=r"judge\.mode=prob .* \(got ray with ray\.engine=vllm\)"):
        check_judge(_config(tmp_path, "generate.backend=ray", "ray.engine=vllm", "judge.mode=prob"))
    check_judge(_config(tmp_path, "generate.backend=ray", "judge.mode=prob"))  # the transformers engine: allowed


def test_the_pool_is_cached_by_its_settings_and_nothing_shipped_carries_the_registry(cluster, tiny_model_path,
                                                                                     tmp_path):
    cfg = _config(tmp_path, "generate.backend=ray", f"ray.address={cluster}")
    backend = make_backend(cfg.generate, str(tiny_model_path), "cpu", ray=cfg.ray)
    assert isinstance(backend, RayBackend)
    assert make_backend(cfg.generate, str(tiny_model_path), "cpu", ray=cfg.ray.model_copy()) is backend
    one = _config(tmp_path, "generate.backend=ray", f"ray.address={cluster}", "ray.actors=1")
    other = make_backend(one.generate, str(tiny_model_path), "cpu", ray=one.ray)
    assert other is not backend  # other ray settings: another backend (the first one left the cluster)

    with Registry(tmp_path) as reg:
        reg.rows("SELECT 1")  # an open DuckDB connection
        sneaky = [lambda engine, b, batch: reg.rows("SELECT 1"),             # a closure's variable
                  lambda engine, b, batch, rows={"registry": reg}: rows,     # a default argument, inside a dict
                  lambda engine, b, batch, con=reg.con: con]                  # the bare connection
        for fn in sneaky:
            with pytest.raises(ValueError, match="must not go to a Ray worker: workers never open the registry"):
                ship(fn)
            with pytest.raises(ValueError, match="must not go to a Ray worker"):
                list(other.run(fn, [(0, ["a prompt"])]))  # refused on the driver, before any actor starts
        with pytest.raises(ValueError, match="carries a Registry"):
            ship([{"prompt": "p", "registry": reg}])  # a batch is shipped the same way
    import pickle

    texts = ["plain", "values"]
    fine = pickle.loads(ship(lambda engine, b, batch: (b, texts, batch)))  # values it captures go with it
    assert fine(None, 3, ["x"]) == (3, ["plain", "values"], ["x"])


def test_single_calls_run_on_one_kept_actor_and_give_the_in_process_texts(cluster, tiny_model_path, tmp_path,
                                                                         one_torch_thread):
    """Self-instruct's kind of use: many single generate calls. They go to one actor the backend keeps (the model
    loads once), give what the in-process engine gives for the same seed, and the actor makes way for a pool."""
    cfg = _config(tmp_path, "generate.backend=ray", f"ray.address={cluster}")
    backend = make_backend(cfg.generate, str(tiny_model_path), "cpu", ray=cfg.ray)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=12)
    prompts = ["Name a colour.", "Name a fruit."]
    first = backend.generate(prompts, params, seed=7, chat=False)
    actor = backend._actor
    assert actor is not None
    pid = backend._one(_pid, None)
    second = backend.generate(prompts, params, seed=8, chat=False)
    assert backend._actor is actor and backend._one(_pid, None) == pid != os.getpid()
    local = TransformersBackend(str(tiny_model_path), "cpu")
    assert first == local.generate(prompts, params, seed=7, chat=False)
    assert second == local.generate(prompts, params, seed=8, chat=False)
    assert first != second  # the seed matters: a real comparison
    out = dict(backend.run(partial(_count, n=2), [(0, ["a"]), (1, ["b", "c"])]))  # the pool gets the 2 CPUs
    assert backend._actor is None and out == {0: 3, 1: 4}


def _pid(engine, index, batch):
    return os.getpid()


def _count(engine, index, batch, *, n):
    return len(batch) + n
