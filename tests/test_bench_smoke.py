"""Every bench script, run as a real subprocess with --smoke: it must finish and print its table with sane figures.

The flow benches (overhead, resume, memory) talk to this session's Prefect API (PREFECT_API_URL from the
`prefect_api` fixture) instead of each starting its own. resume reuses the registry overhead leaves, as its README
suggests, so the run it re-runs has finished.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # every bench/ script in a subprocess


def run_bench(script: str, *args: str, env: dict | None = None) -> list[list[str]]:
    """Run bench/<script>.py; return the rows of its table (header included), cells stripped."""
    proc = subprocess.run([sys.executable, f"bench/{script}.py", *args], cwd=REPO, capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=900)
    assert proc.returncode == 0, f"bench/{script}.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [line.strip("|").split("|") for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert rows, f"bench/{script}.py printed no table:\n{proc.stdout[-2000:]}"
    assert "- machine: " in proc.stdout and "- command: `python bench/" in proc.stdout
    return [[c.strip() for c in r] for r in rows]


def by_first(rows: list[list[str]]) -> dict[str, list[str]]:
    return {r[0]: r[1:] for r in rows}


def times(cell: str) -> float:
    assert cell.endswith("x"), cell
    return float(cell[:-1])


def test_generation():
    table = by_first(run_bench("generation", "--smoke"))
    batched = next(v for k, v in table.items() if k.startswith("batched"))
    baseline = table["loop: 1 sequence per call (baseline)"]
    assert batched[0] == baseline[0]  # the same number of tokens: lengths are fixed
    assert times(baseline[2]) == 1.0 and times(batched[2]) > 1.0


def test_pairs():  # the script itself exits non-zero when pandas and DuckDB choose different pairs
    table = by_first(run_bench("pairs", "--smoke"))
    assert table["pandas groupby baseline (selection + ids + texts + Parquet)"][1] == "1.00x"
    assert float(table["= build_pairs call, total"][0]) > 0


def test_reward():
    table = by_first(run_bench("reward", "--smoke"))
    reward = table["coherent_rewards (SFT + PT, log-probs of the response)"]
    bare = table["bare batched forward (SFT + PT, logits only)"]
    assert reward[0] == bare[0] and int(bare[0]) > 0  # the same tokens on both paths
    assert times(reward[3]) > 0


def test_process_rewards():  # the script itself exits non-zero when a step pair does not fork where it says
    table = by_first(run_bench("process_rewards", "--smoke"))
    assert table["baseline: reward stage, outcome rule (exact_match)"][4] == "1.00x"
    process = next(v for k, v in table.items() if k.startswith("process: reward stage"))
    assert "steps" in process[2] and times(process[4]) > 0
    executemany = next(v for k, v in table.items() if "executemany; insert_many patched" in k)
    assert float(executemany[1]) > 0
    assert int(table["build_pairs, step pairs (pairs.mode=step, step_rule)"][2].split()[0].replace(",", "")) > 0


@pytest.fixture(scope="module")
def api_env(prefect_api):
    import prefect.settings

    return {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value()}


def test_overhead_then_resume(api_env, tmp_path):
    table = by_first(run_bench("overhead", "--smoke", "--registry", str(tmp_path), env=api_env))
    for part in ("iteration 0 (seeds, PT, M1)", "iteration 1", "whole run"):
        wall, compute = float(table[part][0]), float(table[part][1])
        assert 0 < compute < wall
    assert "Prefect start-up (apart)" in table

    table = by_first(run_bench("resume", "--smoke", "--registry", str(tmp_path), env=api_env))
    assert table["first run (baseline)"][0] == "finished before (not timed)"
    assert table["flywheel.backends.models.load calls"][0] == "0"
    assert table["AutoModelForCausalLM.from_pretrained calls"][0] == "0"
    skipped, called = table["stages skipped / called"][0].split(" / ")
    assert skipped == called and int(called) == 3  # seeds, base, sft; the finished iteration is skipped whole
    assert table["iterations skipped whole (no stage called)"][0] == "1 / 1"


def test_memory(api_env, tmp_path):
    rows = [r for r in run_bench("memory", "--smoke", "--registry", str(tmp_path), env=api_env) if r[0].isdigit()]
    assert {"seeds", "base", "sft", "self_instruct", "generate", "reward", "pairs", "dpo"} <= {r[1] for r in rows}
    for r in rows:
        start, peak = float(r[2]), float(r[3])
        assert 0 < start <= peak


def test_judge():
    table = by_first(run_bench("judge", "--smoke"))
    prob = next(v for k, v in table.items() if k.startswith("prob"))
    baseline = next(v for k, v in table.items() if k.startswith("sample"))
    assert times(baseline[1]) == 1.0 and float(prob[0]) > 0 and float(baseline[0]) > 0
    assert prob[2].endswith("%")


def test_dpo():
    table = by_first(run_bench("dpo", "--smoke"))
    base = next(v for k, v in table.items() if k.startswith("baseline"))
    lean = next(v for k, v in table.items() if k.startswith("lean"))
    assert base[0] == lean[0] == "1"  # one step each
    assert times(base[2]) == 1.0 and float(lean[3].replace(",", "")) > 0


def test_serve_load():  # the script exits non-zero on any 5xx, or when a phase served no normal request
    table = by_first(run_bench("serve_load", "--smoke"))
    baseline, abused = table["baseline: normal clients alone"], table["under abuse"]
    assert baseline[4] == "1.00x" and times(abused[4]) > 0
    assert int(abused[0]) > int(baseline[0])  # the abusive requests were sent, and answered (no 5xx: checked above)


def test_browse_load():  # `flywheel browse` as a real subprocess over a registry built with SQL
    table = by_first(run_bench("browse_load", "--smoke"))
    assert {"one pair", "text search"} <= set(table), table
    assert all(float(v[0]) > 0 for k, v in table.items() if k != "page")
