"""The random-kill harness (bench/kill_harness.py) in its smoke mode, as CI runs it: a reference run, then three
real SIGKILLs of the run's process group, one inside each of generate, reward and dpo, each resumed by a plain run and
compared with the reference (tables, weights, dataset versions). Every kill must land in the stage it targeted (the
ledger row it left 'running') and every resume must match, with no difference counted."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # a reference run and six more runs in subprocesses (~2-3 minutes on one thread)


def test_kill_harness_smoke(tmp_path):
    record = tmp_path / "kills.json"
    proc = subprocess.run([sys.executable, "bench/kill_harness.py", "--smoke", "--workdir", str(tmp_path / "work"),
                           "--json", str(record)], check=False, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert "## Kill and resume, by stage: 3 kills" in proc.stdout and "- command: `python bench/" in proc.stdout

    result = json.loads(record.read_text())
    kills = result["kills"]
    assert [k["target"] for k in kills] and sorted(k["target"] for k in kills) == ["dpo", "generate", "reward"]
    for k in kills:
        assert k["killed"] and not k["error"], k
        assert k["landed"] == k["target"], f"kill {k['n']} aimed at {k['target']} landed in {k['landed']}"
        assert k["resume_rc"] == 0 and k["differences"] == [] and k["matched"], k
    assert result["summary"]["differences"] == 0 and result["summary"]["matched"] == 3
    stages = [s["stage"] for s in result["reference"]["stages"]]
    assert stages == ["seeds", "base", "sft", "self_instruct", "generate", "judge", "reward", "pairs", "dpo"]
