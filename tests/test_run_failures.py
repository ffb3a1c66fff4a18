"""A run that cannot go on says so once, in words, and its report says it failed."""

import subprocess
import sys

import pytest

from tests.helpers import REPO
from tests.helpers.models import tiny_overrides

pytestmark = pytest.mark.slow  # a real `flywheel run` in a subprocess


def test_a_run_without_pairs_stops_with_one_message_and_a_failed_report(tmp_path):
    """A random tiny model never writes a verdict, so judge-only pairs are empty and DPO has nothing to train on."""
    root = tmp_path / "reg"
    overrides = [*tiny_overrides(tmp_path, root), "reward.weights={judge: 1.0}", "reward.coherent=false"]
    p = subprocess.run([sys.executable, "-m", "flywheel.cli", "run", "--config", "tests/small.yaml", *overrides],
                       cwd=REPO, capture_output=True, text=True, timeout=1200)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-3000:]
    assert "produced no preference pairs (prompts without a pair: no scored candidate" in out
    assert "stops here again" in out  # not "run it again to resume": that repeats the failure
    for noise in ("Traceback", "nanobind", "Error logging to API"):
        assert noise not in out, noise
    (report,) = (root / "runs").glob("*/report.md")
    assert "This run FAILED: it stopped in dpo (iteration 1): NoTrainingDataError" in report.read_text()
