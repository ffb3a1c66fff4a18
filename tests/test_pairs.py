"""The pair SQL on a real DuckDB registry, with judgments written by hand so every case is known."""

import json

import pyarrow.parquet as pq
import pytest

from flywheel.registry import Registry
from flywheel.registry.datasets import (
    DATASET_SQL,
    DatasetIntegrityError,
    freeze_dataset,
    prepared_rows,
    read_version,
    stage_version,
    version,
)
from flywheel.stages.pairs import EXTREMES_SQL, FAST_EXTREMES_SQL, JUDGE_VALUES, build_pairs, combined_scores
from tests.helpers.registry import reward_row, write_judged

JUDGE_SID = "judge-test"


def _write(reg, scores: dict[str, dict[str, list[float | None]]], lengths: dict[str, int] | None = None):
    """scores: prompt -> candidate -> judge sample scores (None = a parse failure); lengths: candidate -> tokens."""
    write_judged(reg, scores, JUDGE_SID, lengths)


def _pairs(cfg, reward_sid=None):
    result = build_pairs(cfg, "r", 1, JUDGE_SID, reward_sid)
    with Registry(cfg.registry.root) as reg:
        rows = reg.rows("SELECT * FROM pairs WHERE stage_run_id = ? ORDER BY prompt_id", [result.stage_run_id])
    return result, {r["prompt_id"]: r for r in rows}


def test_best_vs_worst_with_ties_and_failures(cfg):
    with Registry(cfg.registry.root) as reg:
        _write(reg, {
            "p1": {"a": [4, 5, 3], "b": [1, 2, None], "c": [3, 3, 3]},   # a=4.0 chosen, b=1.5 rejected
            "p2": {"d": [3, 3], "e": [3, None]},                         # all tie -> dropped
            "p3": {"f": [5, 5], "g": [None, None]},                      # g has no valid sample -> only f -> no pair
            "p4": {"h": [2], "i": [2], "j": [0]},                        # h, i tie for best: larger id chosen
            "p5": {"k": [None], "l": [None, None]},                      # no valid sample at all -> no pair
        })
    result, pairs = _pairs(cfg)
    assert set(pairs) == {"p1", "p4"}
    assert (pairs["p1"]["chosen_id"], pairs["p1"]["rejected_id"]) == ("a", "b")
    assert (pairs["p1"]["chosen_score"], pairs["p1"]["rejected_score"]) == (4.0, 1.5)
    assert (pairs["p4"]["chosen_id"], pairs["p4"]["rejected_id"]) == ("i", "j")
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs.values())
    assert result.stats["pairs"] == 2 and result.stats["prompts_scored"] == 4
    # why the other three made none: a tie is only a tie when two candidates were scored
    assert result.stats["unpaired"] == {"no_scored_candidate": 1, "one_scored_candidate": 1, "tie": 1,
                                        "within_min_margin": 0}

    with Registry(cfg.registry.root) as reg:
        train = read_version(reg, stage_version(reg, result.stage_run_id, "train")).to_pylist()
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in train) == [
        ("question p1", "answer a", "answer b"), ("question p4", "answer i", "answer j")]


def test_min_margin_drops_close_pairs(cfg):
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [4], "b": [3.5]}, "p2": {"c": [5], "d": [1]}})
    cfg.pairs.min_margin = 1.0
    _, pairs = _pairs(cfg)
    assert set(pairs) == {"p2"}


def test_running_twice_is_a_no_op(cfg):
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [5], "b": [1]}})
    first, _ = _pairs(cfg)
    second, pairs = _pairs(cfg)
    assert not first.skipped and second.skipped and second.stage_run_id == first.stage_run_id
    with Registry(cfg.registry.root) as reg:
        assert reg.scalar("SELECT count(*) FROM pairs") == 1


def test_no_scores_gives_no_pairs(cfg):
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [None], "b": [None]}})
    result, pairs = _pairs(cfg)
    assert pairs == {} and result.stats["pairs"] == 0


def test_the_frozen_train_version_is_the_training_set(cfg, monkeypatch):
    """The stage writes its train version from the rows it selected (no second query, no snapshot of its own): the
    same rows, order and version id as the registry's pairs give through DATASET_SQL, the version `restore_version`
    rebuilds. Nothing is left behind: no prepared table, no snapshots folder."""
    import flywheel.stage

    temp_tables = []
    freeze = flywheel.stage.freeze_stage_outputs

    def watched(reg, *a, **kw):  # the temp tables on the stage's connection before and after the freeze
        listed = "SELECT table_name FROM duckdb_tables() WHERE temporary ORDER BY 1"
        temp_tables.append([r["table_name"] for r in reg.rows(listed)])
        out = freeze(reg, *a, **kw)
        temp_tables.append([r["table_name"] for r in reg.rows(listed)])
        return out

    monkeypatch.setattr(flywheel.stage, "freeze_stage_outputs", watched)
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [5], "b": [1]}, "p2": {"c": [4], "d": [2]}, "p3": {"e": [3], "f": [3]},
                     "p4": {"g": [0.5], "h": [2.5]}})
    result, pairs = _pairs(cfg)
    assert temp_tables == [[prepared_rows(result.stage_run_id).strip('"')], []]  # written from it, then dropped
    sid, versions = result.stage_run_id, result.stats["dataset_versions"]
    assert "snapshot" not in result.stats and "snapshot_hash" not in result.stats
    assert not (cfg.registry.root / "snapshots").exists()
    with Registry(cfg.registry.root) as reg:
        train = read_version(reg, versions["train"])
        assert train.to_pylist() == reg.rows(DATASET_SQL["train"], {"sid": sid})  # in pair_id order
        assert [r["pair_id"] for r in train.to_pylist()] == sorted(p["pair_id"] for p in pairs.values())
        assert version(reg, versions["train"])["num_rows"] == 3
        for name, vid in versions.items():  # the same rows frozen from the registry: the same version
            assert freeze_dataset(reg, name, sid, run_id="r", iteration=1, derived_from=[], config_hash="h") == vid


def _same_as_from_the_registry(cfg, result):
    """The stage's versions are those DATASET_SQL gives from the registry's rows (what `restore_version` rebuilds)."""
    with Registry(cfg.registry.root) as reg:
        for name, vid in result.stats["dataset_versions"].items():
            assert freeze_dataset(reg, name, result.stage_run_id, run_id="r", iteration=1, derived_from=[],
                                  config_hash="h") == vid


def test_a_pair_whose_prompt_row_is_gone_is_kept_out_of_the_training_set(cfg):
    """As before: the pair is selected (the pairs table), the train SQL's inner join leaves it out."""
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [5], "b": [1]}, "p2": {"c": [4], "d": [2]}})
        reg.con.execute("DELETE FROM prompts WHERE prompt_id = 'p2'")
    result, pairs = _pairs(cfg)
    assert set(pairs) == {"p1", "p2"} and result.stats["pairs"] == 2
    with Registry(cfg.registry.root) as reg:
        train = read_version(reg, result.stats["dataset_versions"]["train"]).to_pylist()
    assert [r["prompt_id"] for r in train] == ["p1"]
    _same_as_from_the_registry(cfg, result)


def test_dpo_reads_the_train_version_and_refuses_an_altered_one(cfg, monkeypatch):
    import flywheel.training.dpo as dpo
    from flywheel.stage import IterationState, StageContext

    (cfg.registry.root / "m1").mkdir(parents=True)  # a model folder that is there (M1 is registered unhashed)
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [5], "b": [1]}, "p2": {"c": [4], "d": [2]}})
        reg.register_model(model_id="m1", run_id="r", name="M1", kind="sft", iteration=0, parent_id=None,
                           path=str(cfg.registry.root / "m1"), stage_run_id="sft-x", config_hash="h")
    result, _ = _pairs(cfg)
    jobs = []

    def fake_train_stage(ctx, trainer, model_id, inputs, make_job):  # what DPO would train on, without training
        with Registry(ctx.cfg.registry.root) as reg:
            jobs.append(make_job(reg, "dpo-x"))

    monkeypatch.setattr(dpo, "train_stage", fake_train_stage)
    ctx, state = StageContext(cfg, "r", 1), IterationState(model="m1", pairs=result.stage_run_id)
    dpo.train_dpo(ctx, state)
    (job, extra), = jobs
    vid = result.stats["dataset_versions"]["train"]
    assert extra["dataset_version"] == vid
    with Registry(cfg.registry.root) as reg:
        path = reg.root / version(reg, vid)["path"]
        expected = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_version(reg, vid).to_pylist()]
    assert job.rows == expected and len(expected) == 2

    table = pq.read_table(path)  # a readable file whose training text was changed: refused, DPO never sees it
    rows = table.to_pylist()
    rows[0]["chosen"] = "evil"
    pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    with pytest.raises(DatasetIntegrityError, match="was altered"):
        dpo.train_dpo(ctx, state)
    assert len(jobs) == 1


def test_length_control_picks_shortest_top_and_longest_bottom(cfg):
    # scores a=5 b=4.5 c=3 d=1 e=0.5; rho=0.2 over [0.5, 5]: top band >= 4.1 (a, b), bottom band <= 1.4 (d, e)
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [5], "b": [4.5], "c": [3], "d": [1], "e": [0.5]}},
               lengths={"a": 50, "b": 10, "c": 5, "d": 40, "e": 20})
    _, plain = _pairs(cfg)
    assert (plain["p1"]["chosen_id"], plain["p1"]["rejected_id"]) == ("a", "e")   # rho = 0: best vs worst
    cfg.pairs.rho = [0.0, 0.2]  # one value per iteration: iteration 1 uses 0.0, so ask for iteration 2
    result = build_pairs(cfg, "r", 2, JUDGE_SID)
    with Registry(cfg.registry.root) as reg:
        row = reg.rows("SELECT * FROM pairs WHERE stage_run_id = ?", [result.stage_run_id])[0]
    assert (row["chosen_id"], row["rejected_id"]) == ("b", "d")   # shortest of the top band, longest of the bottom
    assert json.loads(row["signals"])["rho"] == 0.2 and result.stats["rho"] == 0.2
    _same_as_from_the_registry(cfg, result)


def _rewards(reg, values: dict[str, float | None], signal="coherent", sid="reward-test"):
    reg.insert("rewards", [reward_row(c, v, sid, signal) for c, v in values.items()])
    return sid


def test_judge_and_coherent_reward_are_z_scored_and_summed(cfg):
    # judge: a=4 b=3 c=2 (z = 1.22, 0, -1.22); coherent: a=-10 b=30 c=-20 (z = -0.46, 1.39, -0.93)
    # sum: a=0.76 b=1.39 c=-2.15 -> chosen b, rejected c. Judge alone would choose a.
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [4], "b": [3], "c": [2]}, "p2": {"d": [5], "e": [1], "f": [3]}})
        sid = _rewards(reg, {"a": -10.0, "b": 30.0, "c": -20.0, "d": 1.0, "e": 2.0, "f": None})
    cfg.reward.coherent = True
    cfg.reward.weights = {"judge": 1.0, "coherent": 1.0}
    result, pairs = _pairs(cfg, reward_sid=sid)
    assert (pairs["p1"]["chosen_id"], pairs["p1"]["rejected_id"]) == ("b", "c")
    assert pairs["p1"]["chosen_score"] == pytest.approx(0.0 + (30 - 0) / (1400 / 3) ** 0.5, abs=1e-9)
    signals = json.loads(pairs["p1"]["signals"])
    assert signals["weights"] == {"coherent": 1.0, "judge": 1.0}
    assert signals["chosen"] == {"judge": 3.0, "coherent": 30.0} and signals["rejected"] == {"judge": 2.0, "coherent": -20.0}
    # f has no coherent reward: it is left out, so p2 pairs d and e only (z: d = (1, -1), e = (-1, 1) -> a tie: dropped)
    assert "p2" not in pairs and result.stats["signals"] == ["coherent", "judge"]
    _same_as_from_the_registry(cfg, result)

    with Registry(cfg.registry.root) as reg:
        rows = combined_scores(reg, cfg, JUDGE_SID, sid)
    assert {r["candidate_id"] for r in rows} == {"a", "b", "c", "d", "e"}


def test_coherent_reward_alone_is_used_as_it_is(cfg):
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [5], "b": [1], "c": [None]}})
        sid = _rewards(reg, {"a": -3.0, "b": 7.5, "c": 1.0})
    cfg.reward.coherent = True
    cfg.reward.weights = {"judge": 0.0, "coherent": 1.0}
    _, pairs = _pairs(cfg, reward_sid=sid)
    assert (pairs["p1"]["chosen_id"], pairs["p1"]["rejected_id"]) == ("b", "a")   # c counts: the judge is not weighted
    assert (pairs["p1"]["chosen_score"], pairs["p1"]["rejected_score"]) == (7.5, -3.0)


def test_fast_path_picks_what_the_general_statement_picks(cfg):
    """One weighted signal and rho = 0 take a plain GROUP BY (no z-scores, no windows); on ties, parse failures and
    single-candidate prompts it must give the general statement's table row for row."""
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [4, 5, 3], "b": [1, 2, None], "c": [3, 3, 3]}, "p2": {"d": [3, 3], "e": [3, None]},
                     "p3": {"f": [5, 5], "g": [None, None]}, "p4": {"h": [2], "i": [2], "j": [0]},
                     "p5": {"k": [1.5], "l": [4], "m": [4], "n": [1.5]}},
               lengths={"a": 9, "b": 1, "h": 3, "i": 7})
        weights = [{"signal": "judge", "weight": 1.0}]
        tables = []
        for sql, params in ((EXTREMES_SQL, dict(judge_sid=JUDGE_SID, reward_sid=None, weights=weights, rho=0.0)),
                            (FAST_EXTREMES_SQL.format(values=JUDGE_VALUES), dict(judge_sid=JUDGE_SID, signal="judge"))):
            reg.con.execute(sql, params)
            tables.append(reg.rows(
                "SELECT e.prompt_id, ch.candidate_id AS chosen, e.chosen_score, e.chosen_raw::VARCHAR AS chosen_raw, "
                "rj.candidate_id AS rejected, e.rejected_score, e.rejected_raw::VARCHAR AS rejected_raw "
                "FROM pair_extremes e JOIN candidates ch ON ch.rowid = e.chosen_row "
                "JOIN candidates rj ON rj.rowid = e.rejected_row ORDER BY prompt_id"))
    assert tables[0] == tables[1] and len(tables[0]) == 5
    by_prompt = {r["prompt_id"]: (r["chosen"], r["rejected"]) for r in tables[1]}
    assert by_prompt["p4"] == ("i", "j") and by_prompt["p5"] == ("m", "k") and by_prompt["p3"] == ("f", "f")
    assert tables[1][0]["chosen_raw"] == '{"judge":4.0}'
