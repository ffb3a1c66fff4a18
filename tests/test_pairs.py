"""The pair SQL on a real DuckDB registry, with judgments written by hand so every case is known."""

import pytest

from flywheel.config import load_config
import json

import pyarrow as pa

from flywheel.pairs import (EXTREMES_SQL, FAST_EXTREMES_SQL, JUDGE_VALUES, SnapshotError, build_pairs, combined_scores,
                           read_snapshot, snapshot_path, table_hash)
from flywheel.registry import Registry, now

JUDGE_SID = "judge-test"


def _write(reg, scores: dict[str, dict[str, list[float | None]]], lengths: dict[str, int] | None = None):
    """scores: prompt -> candidate -> judge sample scores (None = a parse failure); lengths: candidate -> tokens."""
    common = dict(run_id="r", iteration=1, config_hash="h", created_at=now())
    for p, cands in scores.items():
        reg.insert("prompts", [dict(prompt_id=p, source="self_instruct", text=f"question {p}", reference=None,
                                    seed_id=None, few_shot_ids=None, kept=True, drop_reason=None, model_id="m",
                                    stage_run_id="si", **common)])
        for c, samples in cands.items():
            reg.insert("candidates", [dict(candidate_id=c, prompt_id=p, sample_index=0, text=f"answer {c}",
                                           num_tokens=(lengths or {}).get(c, 2), finish_reason="stop", model_id="m", backend="transformers",
                                           sampling={}, seed=0, stage_run_id="gen", **common)])
            reg.insert("judgments", [
                dict(judgment_id=f"{c}-{k}", candidate_id=c, sample_index=k, raw_text=f"Score: {s}", score=s,
                     parse_error=None if s is not None else "no_score", judge_model_id="m", template_hash="t",
                     sampling={}, stage_run_id=JUDGE_SID, **common)
                for k, s in enumerate(samples)])


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"registry.root={tmp_path}"])


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
        })
    result, pairs = _pairs(cfg)
    assert set(pairs) == {"p1", "p4"}
    assert (pairs["p1"]["chosen_id"], pairs["p1"]["rejected_id"]) == ("a", "b")
    assert (pairs["p1"]["chosen_score"], pairs["p1"]["rejected_score"]) == (4.0, 1.5)
    assert (pairs["p4"]["chosen_id"], pairs["p4"]["rejected_id"]) == ("i", "j")
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs.values())
    assert result.stats["pairs"] == 2 and result.stats["prompts_scored"] == 4 and result.stats["unpaired"] == 2

    with Registry(cfg.registry.root) as reg:
        snap = read_snapshot(reg, result.stage_run_id, result.stats["snapshot_hash"])
    assert sorted((r["prompt"], r["chosen"], r["rejected"]) for r in snap) == [
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


def test_snapshot_is_checked_on_read(cfg):
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"a": [5], "b": [1]}, "p2": {"c": [4], "d": [2]}})
    result, _ = _pairs(cfg)
    sid, expected = result.stage_run_id, result.stats["snapshot_hash"]
    with Registry(cfg.registry.root) as reg:
        path = snapshot_path(reg, sid)
        good = read_snapshot(reg, sid, expected)
        assert len(good) == 2

        path.write_bytes(path.read_bytes()[:-40])  # truncated: not Parquet any more
        with pytest.raises(SnapshotError, match=f"{path} cannot be read"):
            read_snapshot(reg, sid, expected)

        reg.con.sql("SELECT 'pr-x' AS pair_id, 'p1' AS prompt_id, 'q' AS prompt, 'evil' AS chosen, 'r' AS rejected, "
                    "5.0 AS chosen_score, 1.0 AS rejected_score").write_parquet(str(path))  # readable, but altered
        with pytest.raises(SnapshotError, match="does not match the hash"):
            read_snapshot(reg, sid, expected)

        path.unlink()  # missing: derived data, rewritten from the registry
        assert read_snapshot(reg, sid, expected) == good


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


def _rewards(reg, values: dict[str, float | None], signal="coherent", sid="reward-test"):
    reg.insert("rewards", [dict(reward_id=f"{signal}-{c}", candidate_id=c, signal=signal, value=v,
                                error=None if v is not None else "failed", details={}, policy_model_id="sft",
                                ref_model_id="pt", run_id="r", iteration=1, stage_run_id=sid, config_hash="h",
                                created_at=now()) for c, v in values.items()])
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
            tables.append(reg.rows("SELECT prompt_id, ch, rj FROM pair_extremes ORDER BY prompt_id"))
    assert tables[0] == tables[1] and len(tables[0]) == 5
    by_prompt = {r["prompt_id"]: (r["ch"]["id"], r["rj"]["id"]) for r in tables[1]}
    assert by_prompt["p4"] == ("i", "j") and by_prompt["p5"] == ("m", "k") and by_prompt["p3"] == ("f", "f")


def test_table_hash_sees_content_not_layout():
    t = pa.table({"id": ["a", "bb", None], "x": [1.0, 2.5, 3.0]})
    same = pa.Table.from_batches(t.to_batches(max_chunksize=1)).cast(
        pa.schema([pa.field("id", pa.large_string()), pa.field("x", pa.float64())]))
    assert table_hash(t) == table_hash(same)
    assert table_hash(t) != table_hash(pa.table({"id": ["a", "bb", ""], "x": [1.0, 2.5, 3.0]}))   # null vs ""
    assert table_hash(t) != table_hash(pa.table({"id": ["ab", "b", None], "x": [1.0, 2.5, 3.0]}))  # where bytes split
    assert table_hash(t) != table_hash(pa.table({"id": ["a", "bb", None], "x": [1.0, 2.5, 3.5]}))
