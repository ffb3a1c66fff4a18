"""The per-iteration report on a real DuckDB registry written by hand (tests/test_monitors.build_run): the figures it
counts, the terminal tables, report.md with its PNG plots, the Markdown string for Prefect, and `flywheel report`."""

from __future__ import annotations

import json
import random

import pytest
from rich.console import Console

from flywheel.cli import main as cli_main
from flywheel.registry import Registry
from flywheel.report import collect, markdown, print_report, spearman, write
from flywheel.monitors import evaluate
from tests.test_monitors import HEALTHY, build_run, steady_tokens

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _coherent(p, j):
    return [0.5, -1.0, 0.2, 0.1][j] + 0.01 * p


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two runs: 'run-old' with one iteration, then 'run-new' with three (a coherent reward in iteration 2)."""
    root = tmp_path_factory.mktemp("registry")
    build_run(root, [HEALTHY], run_id="run-old")
    build_run(root, [dict(HEALTHY, dropped={"too_short": 2, "near_duplicate": 1}),
                     dict(HEALTHY, tokens=lambda p, j: 2 * steady_tokens(p, j), coherent=_coherent, loss=0.4),
                     dict(HEALTHY, scores=lambda p, j: [3, None])], run_id="run-new")
    return root


def test_figures_are_counted_from_the_registry(registry):
    with Registry(registry) as reg:
        its = collect(reg, "run-new")
    assert [it["iteration"] for it in its] == [1, 2, 3]
    one, two, three = its
    assert (one["prompts_made"], one["prompts_kept"], one["prompts_dropped"]) == (23, 20, {"near_duplicate": 1,
                                                                                          "too_short": 2})
    assert (one["model_in"], one["model_out"], one["trainer"]) == ("M1", "M2", "dpo")
    assert (two["model_in"], two["model_out"]) == ("M2", "M3")
    assert one["candidates"] == 80 and one["judge_samples"] == 160 and one["parse_failure_rate"] == 0
    assert one["mean_score"] == 3.0 and one["sample_score_counts"] == {"1": 40, "3": 80, "5": 40}
    assert [n for _, _, n in one["candidate_score_hist"]] == [0, 0, 20, 0, 0, 0, 40, 0, 0, 20]
    assert one["mean_tokens"] == 22.5 and one["mean_words"] == 20
    assert one["pairs"] == 20 and one["margin"]["median"] == 4 and one["longer_chosen_share"] == 0.5
    assert one["agreement"] is None and one["rewards"] == {}
    assert two["rewards"]["coherent"]["candidates"] == 80 and two["agreement_candidates"] == 80
    assert two["agreement"] == spearman([float(HEALTHY["scores"](p, j)[0]) for p in range(20) for j in range(4)],
                                        [_coherent(p, j) for p in range(20) for j in range(4)])
    assert one["train_loss"] == 0.6 and two["training"] == {"train_loss": 0.4, "steps": 3}
    # deltas against the iteration before
    assert one["delta"]["mean_tokens"] is None
    assert two["delta"]["mean_tokens"] == 22.5 and two["delta"]["train_loss"] == pytest.approx(-0.2)
    assert three["parse_failure_rate"] == 0.5 and three["delta"]["parse_failure_rate"] == 0.5
    assert three["judge_self_agreement"] is None  # one valid sample per candidate: nothing to compare


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    rng = random.Random(3)
    for _ in range(20):
        xs = [rng.randint(0, 5) for _ in range(30)]  # many ties, as judge scores have
        ys = [x + rng.gauss(0, 2) for x in xs]
        assert spearman(xs, ys) == pytest.approx(spearmanr(xs, ys).statistic, abs=1e-4)
    assert spearman([1, 2], [2, 1]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_terminal_text_shows_every_iteration_and_the_warnings(registry):
    with Registry(registry) as reg:
        its = collect(reg, "run-new")
    console = Console(record=True, width=250)
    print_report("run-new", its, evaluate(its), console)
    text = console.export_text()
    for label in ("mean judge score", "parse-failure rate", "mean length (tokens)", "pairs", "train loss",
                  "judge vs coherent", "iteration 3 (M3 -> M4)", "near_duplicate 1, too_short 2"):
        assert label in text
    assert "45.0 (+22.5)" in text  # iteration 2's length, with its change
    assert "WARNING length_drift (length drift), iteration 2: mean length 22.5 -> 45.0 tokens (+100%" in text
    assert "WARNING parse_failures (broken judge), iteration 3" in text


def test_markdown_file_and_plots(registry):
    with Registry(registry) as reg:
        its, checks, path = write(reg, "run-new")
    assert path == registry / "runs" / "run-new" / "report.md"
    text = path.read_text()
    assert text.startswith("# Report: run run-new")
    assert "Iteration 0: 5 seeds; PT -> M1 by SFT on 5 IFT + 3 EFT examples, loss 1.500" in text
    assert "| mean length (tokens) | 22.5 | 45.0 (+22.5) | 22.5 (-22.5) |" in text
    assert "- **WARNING length_drift** (length drift), iteration 2" in text
    assert "| parse_failures | ok | ok | WARN |" in text
    images = ["curves.png", "scores-1.png", "scores-2.png", "scores-3.png"]
    for name in images:
        assert f"]({name})" in text
        png = (path.parent / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    saved = json.loads((path.parent / "report.json").read_text())
    assert [it["iteration"] for it in saved["iterations"]] == [1, 2, 3]
    assert {c["name"] for c in saved["checks"] if c["status"] == "WARN"} == {"length_drift", "parse_failures"}


def test_markdown_string_for_a_prefect_artifact(registry):
    with Registry(registry) as reg:
        text = markdown(reg, "run-new")
    assert "| pairs | 20 | 20 (+0) |" in text and "![" not in text  # tables, no local images
    assert "report.md" in text and "WARNING parse_failures" in text


def test_cli_defaults_to_the_newest_run_and_strict_fails_on_a_warning(registry, capsys):
    assert cli_main(["report", "--registry", str(registry), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "run run-new" in out and "WARNING length_drift" in out and "--strict: 2 monitor warning(s)" in out
    assert cli_main(["report", "run-old", "--registry", str(registry), "--strict"]) == 0  # healthy, one iteration
    assert "run run-old" in capsys.readouterr().out
    assert (registry / "runs" / "run-old" / "report.md").is_file()


def test_cli_errors_name_what_is_wrong(registry, tmp_path, capsys):
    assert cli_main(["report", "no-such-run", "--registry", str(registry)]) == 2
    out = capsys.readouterr().out
    assert "no run 'no-such-run'" in out and "run-new" in out
    assert cli_main(["report", "--registry", str(tmp_path / "nowhere")]) == 2
    assert "no registry at" in capsys.readouterr().out
    Registry(tmp_path / "empty").close()
    assert cli_main(["report", "--registry", str(tmp_path / "empty")]) == 2
    assert "holds no runs yet" in capsys.readouterr().out


def test_an_iteration_still_running_renders_with_gaps(tmp_path):
    from tests.test_monitors import _stage

    run = build_run(tmp_path, [HEALTHY])
    with Registry(tmp_path) as reg:
        reg.start_iteration(run, 2, "M2-model")
        _stage(reg, run, 2, "self_instruct")  # started, nothing written yet; no generate, judge, pairs or trainer
        its, checks, path = write(reg, run)
    two = its[1]
    assert (two["iteration"], two["status"], two["prompts_made"], two["candidates"], two["pairs"]) == (2, "running", 0,
                                                                                                      None, None)
    assert two["model_out"] is None and two["delta"]["mean_score"] is None
    assert {c.status for c in checks if c.iteration == 2} == {"n/a"}
    text = path.read_text()
    assert "| candidates | 80 | - |" in text and "scores-2.png" not in text
    assert (path.parent / "curves.png").read_bytes().startswith(PNG_MAGIC)
