"""Kill -9 a real run at four points, resume it, and check it ends exactly as a run that was never interrupted.

One uninterrupted reference run (seeds -> PT -> M1 -> self-instruct -> generate -> judge -> reward -> pairs -> DPO on
a tiny model, `flywheel.pipeline.run` without Prefect) is copied after each
stage. Each test forks the copy taken just before its kill point, runs the stages in a real subprocess, kills it with
SIGKILL at that point, resumes, and compares every table with the reference (less timestamps and timing stats), the
model weights byte for byte, and checks that no table has two rows with one key and that every registered model
folder is complete. Kill points: inside generation and inside judging (after a committed batch), between stages
(generate's ledger row says done, judge has not started) and in training (DPO's model written to its temp folder,
not yet renamed into place). The judging one resumes through `flywheel resume` and the real Prefect flow.

Every fork lives at the same path, so configs (and the config hashes rows record) are identical across runs. Pairs
come from the coherent reward (log p_SFT - log p_PT), which a random tiny model yields for every candidate; its judge
cannot write a verdict, and the judge stage runs all the same.
"""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from flywheel import pipeline
from flywheel.config import FlywheelConfig, load_config
from flywheel.registry import Registry
from tests.helpers.compare import _ledger, _rows, check_registry
from tests.helpers.models import tiny_overrides
from tests.helpers.processes import kill_at_marker

pytestmark = pytest.mark.slow  # real runs in subprocesses, killed and resumed

REPO = Path(__file__).resolve().parents[1]
STAGES = ["seeds", "base", "sft", "self_instruct", "generate", "judge", "reward", "pairs", "dpo"]


def run_sequence(cfg: FlywheelConfig, after=lambda stage: None) -> str:
    """The run as `flywheel.pipeline.run` does it (what the Prefect flow wraps), without Prefect; `after(stage)` once
    each stage is done."""
    def call(step, ctx, state):
        state = pipeline.call_here(step, ctx, state)
        after(step.name)
        return state

    return pipeline.run(cfg, call=call)


# --- the child: the same stages, with a place to stop -------------------------------------------------------------

CHILD = """
import logging, sys
from flywheel.config import load_config
from tests.test_kill_resume import pause_after, pause_before_rename, run_sequence
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
point, overrides = sys.argv[1], sys.argv[2:]
if point == "rename":
    pause_before_rename()
run_sequence(load_config(None, overrides), after=pause_after(point))
"""


def pause_after(stop_after: str):
    """Report each finished stage on stderr; after `stop_after`, wait (for the kill) before the next one starts."""
    def after(stage: str) -> None:
        print(f"stage done: {stage}", file=sys.stderr, flush=True)
        if stage == stop_after:
            sys.stdin.readline()
    return after


class _PauseAtRename:
    """Stands in for the `os` module in flywheel.training.loops and flywheel.backends.models: the same, except that replace() says
    which folder it is about to rename into place and waits (for the kill) before doing it."""

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        print(f"about to rename {src} -> {dst}", file=sys.stderr, flush=True)
        sys.stdin.readline()
        os.replace(src, dst)


def pause_before_rename() -> None:
    import flywheel.backends.models
    import flywheel.training.loops

    flywheel.backends.models.os = flywheel.training.loops.os = _PauseAtRename()


def run_child_until(point: str, marker: str, overrides: list[str]) -> str:
    """Start the child, read its stderr until `marker` appears, kill -9 it there; returns what it wrote."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, point, *overrides], stdin=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=REPO)
    return kill_at_marker(child, marker)


# --- the reference run and what is compared ---------------------------------------------------------------------

@dataclass
class Reference:
    work: Path                 # the one registry path every run uses
    snapshots: Path            # <snapshots>/<stage>: the registry right after that stage; <snapshots>/final
    overrides: list[str]

    def fork(self, stage: str) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.snapshots / stage, self.work)

    def cfg(self) -> FlywheelConfig:
        return load_config(None, self.overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    base = tmp_path_factory.mktemp("kill")
    work = base / "registry"
    ref = Reference(work, base / "snapshots", tiny_overrides(base, work))
    run_sequence(ref.cfg(), after=lambda stage: shutil.copytree(work, ref.snapshots / stage))
    shutil.copytree(work, ref.snapshots / "final")
    with Registry(work) as reg:  # enough work left at each kill point for the kill to land inside a stage
        assert reg.scalar("SELECT count(*) FROM prompts WHERE source = 'self_instruct' AND kept") >= 5
        assert reg.scalar("SELECT count(*) FROM pairs") > 0
    return ref


# --- the kill points ----------------------------------------------------------------------------------------------

def test_sigkill_inside_generation_then_resume(reference):
    reference.fork("self_instruct")
    run_child_until("none", "generate: committed batch 1/", reference.overrides)
    partial = _rows(reference.work, "candidates")
    assert 0 < len(partial) < len(_rows(reference.snapshots / "final", "candidates"))
    assert _ledger(reference.work)["generate"] == "running" and "judge" not in _ledger(reference.work)

    run_sequence(reference.cfg())
    check_registry(reference)
    assert partial.items() <= _rows(reference.work, "candidates").items()  # committed batches kept as they were


def test_sigkill_inside_judging_then_flywheel_resume(reference):
    """Resumed by a real `flywheel resume` process: it finds the killed run, rebuilds its config from the registry
    and runs it through the Prefect flow (Prefect's local API) under the registry lock."""
    reference.fork("generate")
    run_child_until("none", "judge: committed batch 1/", reference.overrides)
    partial = _rows(reference.work, "judgments")
    assert 0 < len(partial) < len(_rows(reference.snapshots / "final", "judgments"))
    assert _ledger(reference.work)["judge"] == "running"
    with Registry(reference.work) as reg:
        run_id = reg.scalar("SELECT run_id FROM runs WHERE status = 'running'")

    resume = subprocess.run([sys.executable, "-m", "flywheel.cli", "resume", "--registry", str(reference.work)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert f"resuming {run_id}" in resume.stdout
    check_registry(reference)
    assert partial.items() <= _rows(reference.work, "judgments").items()


def test_sigkill_between_stages_then_resume(reference):
    reference.fork("self_instruct")
    run_child_until("generate", "stage done: generate", reference.overrides)
    ledger = _ledger(reference.work)
    assert ledger["generate"] == "done" and "judge" not in ledger  # killed after one stage, before the next

    run_sequence(reference.cfg())
    check_registry(reference)


def test_sigkill_while_saving_the_trained_model_then_resume(reference):
    reference.fork("pairs")
    out = run_child_until("rename", "about to rename", reference.overrides)
    tmp, final = (Path(p.strip()) for p in out.split("about to rename", 1)[1].splitlines()[0].split(" -> "))
    assert (tmp / "model.safetensors").is_file() and not final.exists()  # written, not yet in place
    with Registry(reference.work) as reg:
        assert reg.scalar("SELECT count(*) FROM models WHERE kind = 'dpo'") == 0  # and so not registered
        assert reg.scalar("SELECT status FROM stage_runs WHERE stage = 'dpo'") == "running"

    run_sequence(reference.cfg())
    check_registry(reference)  # the resumed run trained again, renamed the model into place and registered it
    with Registry(reference.work) as reg:
        assert reg.scalar("SELECT path FROM models WHERE kind = 'dpo'") == str(final)
