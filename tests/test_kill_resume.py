"""A stage killed with SIGKILL mid-way resumes from its last committed batch and ends exactly as an uninterrupted run.

The generate stage runs in a real subprocess on a real registry; we wait for its log line saying a batch was
committed, kill -9 it, run the stage again, and compare with a copy of the registry that was never interrupted.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

from flywheel.bootstrap import import_seeds
from flywheel.config import load_config
from flywheel.generate import generate
from flywheel.registry import Registry, now
from tests.tiny import save_random_tiny_model

OVERRIDES = ["generate.batch_size=4", "generate.n=2", "generate.max_new_tokens=24", "run.device=cpu"]

CHILD = """
import logging, sys
from flywheel.config import load_config
from flywheel.generate import generate
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
cfg = load_config(None, sys.argv[1:-2])
generate(cfg, "run", 1, sys.argv[-2], sys.argv[-1])
"""


def _candidates(root):
    with Registry(root) as reg:
        return reg.rows("SELECT candidate_id, prompt_id, sample_index, text, seed FROM candidates ORDER BY candidate_id")


def test_sigkill_inside_generation_then_resume(tmp_path):
    reg_a, reg_b = tmp_path / "a", tmp_path / "b"
    cfg = load_config(None, OVERRIDES + [f"registry.root={reg_a}"])
    seeds = import_seeds(cfg, "run")
    model_path = save_random_tiny_model(tmp_path / "model")
    with Registry(reg_a) as reg:
        reg.register_model(model_id="m-test", run_id="run", name="M1", kind="sft", iteration=0, parent_id=None,
                           path=str(model_path), stage_run_id="test", config_hash="h", created_at=now())
    shutil.copytree(reg_a, reg_b)  # the same registry, to run uninterrupted

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *OVERRIDES, f"registry.root={reg_a}", "m-test", seeds.stage_run_id],
        stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
    deadline = time.monotonic() + 120
    for line in child.stderr:
        if "generate: committed batch 3/" in line:
            child.send_signal(signal.SIGKILL)
            break
        assert time.monotonic() < deadline, "the child never committed a batch"
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    partial = _candidates(reg_a)
    total = 60 * 2  # the shipped seeds x n
    assert 3 * 4 * 2 <= len(partial) < total  # at least the 3 logged batches survived; not everything was done
    with Registry(reg_a) as reg:
        assert reg.scalar("SELECT status FROM stage_runs WHERE stage = 'generate'") == "running"

    resumed = generate(load_config(None, OVERRIDES + [f"registry.root={reg_a}"]), "run", 1, "m-test",
                       seeds.stage_run_id)
    straight = generate(load_config(None, OVERRIDES + [f"registry.root={reg_b}"]), "run", 1, "m-test",
                        seeds.stage_run_id)
    assert resumed.stage_run_id == straight.stage_run_id
    assert resumed.stats["candidates"] == straight.stats["candidates"] == total
    a, b = _candidates(reg_a), _candidates(reg_b)
    assert a == b  # identical rows: same ids, same texts, same per-batch seeds
    assert len({r["candidate_id"] for r in a}) == len(a)
    assert {r["candidate_id"]: r["text"] for r in partial}.items() <= {r["candidate_id"]: r["text"] for r in a}.items()
