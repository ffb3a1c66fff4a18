"""The one shape every stage has: a key from its inputs, a ledger row, work that skips what is already done.

    result = run_stage(cfg, "generate", run_id, iteration, model_id, inputs={...}, work=fn)

`inputs` holds everything that determines the stage's output (upstream stage ids, model id, the stage's own config
section, template hashes). Its hash is the stage run id, so an unchanged stage gets the same id: if its ledger row
says 'done', `work` is not called at all (no model is loaded); otherwise `work(reg, stage_run_id)` runs and must
itself skip items whose rows exist (that is how a crashed stage resumes). A failure is recorded on the ledger row and
re-raised.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from . import timing
from .backends import GenerationBackend, make_backend
from .backends.models import apply_threads, resolve_device
from .config import ConfigError, FlywheelConfig, content_hash
from .progress import progress
from .registry import Registry
from .registry.datasets import freeze_stage_outputs

log = logging.getLogger("flywheel")


@dataclass
class StageResult:
    stage: str
    stage_run_id: str
    stats: dict = field(default_factory=dict)
    skipped: bool = False
    seconds: float = 0.0

    @property
    def model_id(self) -> str | None:
        """The model a trainer stage made (M1, M_{t+1}, the base); None for a data stage."""
        return self.stats.get("model_id")


# --- the contract every stage has in the pipeline (flywheel/pipeline.py) --------------------------------------------

@dataclass(frozen=True)
class StageContext:
    """What a stage runs in: the config, the run, the iteration (0 for seeds, base and M1)."""

    cfg: FlywheelConfig
    run_id: str
    iteration: int = 0

    def registry(self) -> Registry:
        """The run's registry, opened for one use (`with ctx.registry() as reg:`): DuckDB allows one writing process,
        so a stage holds the file only while it works and readers can get in between."""
        return Registry(self.cfg.registry.root)


@dataclass(frozen=True)
class IterationState:
    """What the stages so far produced: stage run ids of datasets and model ids. A step reads some fields and adds
    one (`dataclasses.replace`); the pipeline carries the state from step to step."""

    seeds: str | None = None              # seeds stage run
    pt: str | None = None                 # the base model (PT)
    m1: str | None = None                 # the SFT model, M1
    model: str | None = None              # M_t: the model this iteration starts from
    earlier_prompts: tuple[str, ...] = ()  # self-instruct stage runs of earlier iterations (their prompts are not repeated)
    prompts: str | None = None            # this iteration's self-instruct stage run
    candidates: str | None = None
    judgments: str | None = None
    rewards: str | None = None
    pairs: str | None = None
    judge_pairs: str | None = None        # the meta-judge stage run: judge-preference pairs


@dataclass(frozen=True)
class Step:
    """One stage as the pipeline sees it: its name (the ledger's), the state fields it reads and the one it adds, the
    function that runs it, and when it runs (a predicate on the config; always by default)."""

    name: str
    consumes: tuple[str, ...]
    produces: str
    run: Callable[[StageContext, IterationState], StageResult]
    when: Callable[[FlywheelConfig], bool] = lambda cfg: True

    def __call__(self, ctx: StageContext, state: IterationState) -> tuple[StageResult, IterationState]:
        missing = [f for f in self.consumes if getattr(state, f) is None and f not in OPTIONAL_INPUTS]
        if missing:
            raise ValueError(f"stage {self.name} (iteration {ctx.iteration}) needs {', '.join(missing)}, which no "
                             "earlier stage produced")
        result = self.run(ctx, state)
        value = result.model_id if self.produces in MODEL_FIELDS else result.stage_run_id
        return result, replace(state, **{self.produces: value})


MODEL_FIELDS = ("pt", "m1", "model")
OPTIONAL_INPUTS = ("judgments", "rewards", "judge_pairs")  # pairs and RS-SFT combine whichever signals ran; DPO adds
# the meta-judge's pairs when it ran


def stage_run_id(stage: str, inputs: dict) -> str:
    return f"{stage}-{content_hash({'stage': stage, **inputs})}"


def run_stage(
    cfg: FlywheelConfig,
    stage: str,
    run_id: str,
    iteration: int,
    model_id: str | None,
    inputs: dict,
    work: Callable[[Registry, str], dict],
) -> StageResult:
    sid = stage_run_id(stage, inputs)
    t0 = time.perf_counter()
    apply_threads(cfg.run.threads)
    with Registry(cfg.registry.root) as reg:
        ledger = reg.begin_stage(
            sid, run_id=run_id, iteration=iteration, stage=stage, model_id=model_id, config_hash=cfg.config_hash()
        )
        if ledger.done:
            return StageResult(stage, sid, ledger.stats, skipped=True, seconds=time.perf_counter() - t0)
        timing.reset()
        try:
            stats = work(reg, sid)
        except BaseException as e:
            reg.fail_stage(sid, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")
            raise
        stats = {**stats, "compute_s": round(timing.seconds(), 3), "wall_s": round(time.perf_counter() - t0, 3)}
        versions = freeze_stage_outputs(reg, stage, sid, run_id=run_id, iteration=iteration, inputs=inputs,
                                        config_hash=cfg.config_hash())
        if versions:
            stats["dataset_versions"] = versions
        reg.end_stage(sid, stats)
    return StageResult(stage, sid, stats, skipped=False, seconds=time.perf_counter() - t0)


def pending_batches(reg: Registry, stage: str, table: str, key: str, items: list, size: int,
                    ids_of: Callable[[list], list[str]], description: str) -> Iterator[tuple[int, list, list[str]]]:
    """The resume mechanism of every long stage: (index, batch, row ids) for each fixed-size batch of `items` whose
    rows are not all in `table` yet. The caller inserts a batch's rows in one transaction before asking for the next;
    then this logs the commit, so a crash loses at most the batch after the last logged one. Fixed boundaries keep
    per-batch seeds, and so a resumed stage's output, identical to an uninterrupted one's."""
    todo = [items[i : i + size] for i in range(0, len(items), size)]
    for b, batch in enumerate(progress(todo, description)):
        ids = ids_of(batch)
        if reg.existing(table, key, ids) == set(ids):
            continue  # committed before a crash
        reg.release()  # the batch's work (generation, scoring) needs no registry: readers can get in
        yield b, batch, ids
        log.info("%s: committed batch %d/%d (%d rows)", stage, b + 1, len(todo), len(ids))


def run_batches(reg: Registry, stage: str, table: str, key: str, items: list, size: int,
                ids_of: Callable[[list], list[str]], description: str, backend: Callable[[], GenerationBackend],
                work: Callable[[GenerationBackend, int, list], Any]) -> Iterator[tuple[int, list, list[str], Any]]:
    """`pending_batches` with each batch's work done: (index, batch, row ids, work(engine, index, batch)) for each
    fixed-size batch of `items` whose rows are not all in `table` yet; the caller commits the batch's rows in one
    transaction before asking for the next. `backend()` gives the generation backend; it is called only when some
    batch is pending (a stage that crashed after its last commit loads no model).

    In-process backends run the batches here, one after another. A RayBackend gets every pending batch at once and
    runs `work` on its actors' engines, yielding batches as they finish: commits may come out of order, which resume
    allows (a batch whose rows are all there is skipped, wherever it falls). So `work` is shipped to Ray workers: it
    must use only its arguments and plain values captured from the stage, never the registry (`ray_data.ship`
    refuses one). The registry is released while batches run, so readers can get in."""
    from .backends.ray_data import RayBackend

    todo = [items[i : i + size] for i in range(0, len(items), size)]
    pending = {}
    for b, batch in enumerate(todo):
        ids = ids_of(batch)
        if reg.existing(table, key, ids) != set(ids):  # else committed before a crash
            pending[b] = ids
    if not pending:
        return
    engine = backend()  # releases the registry before the model loads
    if isinstance(engine, RayBackend):
        results = engine.run(work, [(b, todo[b]) for b in pending])
        for _, (b, result) in zip(progress(list(pending), description), results):
            yield b, todo[b], pending[b], result
            reg.release()
            log.info("%s: committed batch %d/%d (%d rows)", stage, b + 1, len(todo), len(pending[b]))
        next(results, None)  # none is left: lets the Ray Data job end
        return
    for b, batch in enumerate(progress(todo, description)):
        if b in pending:
            reg.release()
            yield b, batch, pending[b], work(engine, b, batch)
            log.info("%s: committed batch %d/%d (%d rows)", stage, b + 1, len(todo), len(pending[b]))


def batch_seed(stage_run_id: str, batch_index: int, run_seed: int) -> int:
    return int(content_hash([stage_run_id, batch_index, run_seed], 8), 16)


def backend_for(cfg: FlywheelConfig, reg: Registry, model_id: str) -> GenerationBackend:
    """The configured generation backend on a registered model (loaded once, shared by consecutive stages). The
    registry is released before the model loads and generates, so readers get in meanwhile."""
    from .registry.integrity import model_path

    path = model_path(reg, model_id)  # its folder is there and its weights are those registered, or a clear error
    reg.release()
    return make_backend(cfg.generate, path, resolve_device(cfg.run.device), ray=cfg.ray)


def read_template(path, setting: str = "template") -> str:
    """The text of a prompt template file; a ConfigError naming the `setting` it came from when there is none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{setting}: template file not found: {path}")
    return path.read_text(encoding="utf-8")


def load_template(reg: Registry, path, name: str) -> tuple[str, str]:
    """(text, hash) of a prompt template file (`read_template`), registered in the registry under its content hash."""
    text = read_template(path, f"{name} template")
    template_hash = content_hash(text)
    reg.register_template(template_hash, name, text)
    return text, template_hash
