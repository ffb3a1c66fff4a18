"""`flywheel experiment`: the mini-world's smoke (configs/experiments/sort-smoke.yaml) through Prefect's local API,
every variant on a real DuckDB registry. The model is too small to learn; the asserts are on the plumbing and on
what must hold whatever the model does (the oracle's path on known answers: tests/test_miniworld.py)."""

import json

import pytest

from flywheel.analysis.experiment import load_experiment, run_experiment, write_results
from flywheel.analysis.miniworld import is_correct
from flywheel.cli import main as cli_main
from flywheel.config import ConfigError
from flywheel.registry import Registry

pytestmark = pytest.mark.slow  # an experiment through Prefect, every variant trained

SMOKE = "configs/experiments/sort-smoke.yaml"


@pytest.fixture(scope="module")
def smoke(prefect_api, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    exp = load_experiment(SMOKE)
    rows = run_experiment(exp, root)
    write_results(exp, root, rows)
    return exp, root, rows


def test_every_variant_scores_m1_and_m2_or_records_why_it_stopped(smoke):
    """This model is too small to write judge verdicts or right answers, so a variant may find no pairs: a recorded,
    counted stop (with M1 scored), while the other variants go on."""
    exp, root, rows = smoke
    stops = json.loads((root / "experiments" / exp.name / "results.json").read_text())["stopped"]
    stopped = {x["variant"] for x in stops}
    assert all("NoTrainingDataError" in x["reason"] and "no preference pairs" in x["reason"] for x in stops)
    assert "plain-sft" not in stopped
    assert sorted((r["variant"], r["model"]) for r in rows) == sorted(
        (v, m) for v in exp.variants for m in ("M1", "M2") if m == "M1" or v not in stopped)
    assert all(f"{v} (run" in (root / "experiments" / exp.name / "results.md").read_text() for v in stopped)
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["test_problems"] == exp.sizes.test
        assert 0 <= r["judge_agreement"] <= 1 and r["judge_problems"] == exp.eval.judge_problems
    # PT and M1 are built once per seed and shared by every variant
    assert len({r["model_id"] for r in rows if r["model"] == "M1"}) == 1
    assert len({r["model_id"] for r in rows if r["model"] == "M2"}) == len({r["variant"] for r in rows
                                                                            if r["model"] == "M2"})


def test_exact_match_is_recomputed_from_the_models_answers(smoke):
    """The cached score of M1 matches a fresh greedy decode checked against the test file."""
    from flywheel.analysis.miniworld import read_jsonl
    from flywheel.backends import SamplingParams, make_backend

    exp, root, rows = smoke
    m1 = next(r for r in rows if r["model"] == "M1")
    with Registry(root) as reg:
        path = reg.model(m1["model_id"])["path"]
    test = read_jsonl(root / "experiments" / exp.name / "world-seed0" / "test.jsonl")
    from flywheel.config import GenerateConfig

    backend = make_backend(GenerateConfig(), path, "cpu")
    outs = backend.generate([t["prompt"] for t in test], SamplingParams(n=1, temperature=0, max_new_tokens=8),
                            seed=0, chat=True)
    assert m1["accuracy"] == sum(is_correct(o[0].text, t["reference"]) for o, t in zip(outs, test)) / len(test)


def test_each_variant_runs_the_stages_its_signals_need(smoke):
    exp, root, rows = smoke
    by = {(r["variant"], r["model"]): r for r in rows}
    assert by[("plain-sft", "M2")]["pairs"] == 0  # the baseline never stops: it needs no pairs
    oracle = by.get(("rule-oracle", "M2"))
    if oracle is not None:  # this model seldom sorts right; when it did, the oracle's pairs are right by ground truth
        assert oracle["pair_accuracy"] == 1.0
    run = {r["variant"]: r["run_id"] for r in rows}
    with Registry(root) as reg:
        stages = {(r["run_id"], r["stage"]) for r in reg.rows("SELECT run_id, stage FROM run_stages WHERE iteration = 1")}
        kinds = {m["run_id"]: m["kind"] for m in reg.rows("SELECT run_id, kind FROM models WHERE iteration = 1")}
    assert (run["judge"], "judge") in stages and (run["judge-coherent"], "judge") in stages
    assert (run["coherent"], "judge") not in stages and (run["rule-oracle"], "judge") not in stages  # not weighted
    assert (run["coherent"], "reward") in stages and (run["rule-oracle"], "reward") in stages
    assert {s for r, s in stages if r == run["plain-sft"]} == {"sft"} and kinds[run["plain-sft"]] == "sft"


def test_results_are_written_and_a_rerun_redoes_nothing(smoke, capsys):
    exp, root, rows = smoke
    out = root / "experiments" / exp.name
    assert (out / "curves.png").stat().st_size > 10_000
    md = (out / "results.md").read_text()
    assert all(f"| {v} | M1 |" in md for v in exp.variants) and "| plain-sft | M2 |" in md
    with Registry(root) as reg:
        before = reg.scalar("SELECT count(*) FROM models"), reg.scalar("SELECT count(*) FROM stage_runs")
    assert cli_main(["experiment", "--registry", str(root), "--config", SMOKE, "sort-smoke"]) == 0
    with Registry(root) as reg:
        assert (reg.scalar("SELECT count(*) FROM models"), reg.scalar("SELECT count(*) FROM stage_runs")) == before
    def same(rs):
        return [{k: v for k, v in r.items() if k != "run_seconds"} for r in json.loads(json.dumps(rs))]
    assert same(json.loads((out / "results.json").read_text())["rows"]) == same(rows)  # scores cached, not redone
    printed = capsys.readouterr().out
    assert "plain-sft" in printed and "exact match" in printed


@pytest.mark.parametrize("override, message", [
    ("seeds=[]", "seeds"),
    ("variants.judge.reward.weights.nonsense=1", "unknown signal"),
    ("world.min_len=12", "min_len"),
    ("config.dpo.beta=-1", "dpo.beta"),
])
def test_a_bad_experiment_config_names_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(SMOKE, [override])
