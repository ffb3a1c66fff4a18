"""Judge agreement with human rankings: the metrics against hand-computed values, then `flywheel eval judge` on the
Open Assistant fixture with a real tiny model (taught only to end with "Score: <random digit>", so it is near chance;
the point is that what it says is counted right)."""

import json
import math
from itertools import combinations

import pytest

from flywheel.analysis.eval_judge import agreement
from flywheel.cli import main
from flywheel.registry import Registry, now

# Hand-computed. A: ranks 0,1,2 / scores 5,3,4: pairs agree, agree, disagree; Spearman 1 - 6*2/(3*8) = 0.5;
# Kendall (2 - 1)/3. B: ranks 0,1,2 / scores 4,4,2 (+ one reply with no valid score): 1 judge tie, 2 agree;
# Spearman = corr([3,2,1], [2.5,2.5,1]) = 1.5/sqrt(2*1.5) = sqrt(3)/2; Kendall tau-b = 2/sqrt(3*2).
# C: humans tie every reply: no pair, no correlation. D: the judge scores both alike: 1 judge tie, no correlation.
DATA = {
    "A": [(0, 5.0), (1, 3.0), (2, 4.0)],
    "B": [(0, 4.0), (1, 4.0), (2, 2.0), (3, None)],
    "C": [(0, 1.0), (0, 5.0)],
    "D": [(0, 3.0), (1, 3.0), (None, 1.0)],
}


def test_metrics_match_hand_computed_values():
    m = agreement(DATA)
    assert (m.prompts, m.prompts_compared, m.prompts_correlated, m.prompts_judge_constant) == (4, 3, 2, 1)
    assert (m.replies, m.unranked, m.unscored) == (12, 1, 1)
    assert (m.pairs, m.agree, m.disagree, m.judge_ties) == (7, 4, 1, 2)
    assert m.pairwise_accuracy == pytest.approx(4 / 5)  # judge ties left out, reported separately
    assert m.pairwise_accuracy_ties_as_wrong == pytest.approx(4 / 7)
    assert m.judge_tie_rate == pytest.approx(2 / 7)
    assert m.spearman == pytest.approx((0.5 + math.sqrt(3) / 2) / 2)
    assert m.kendall_tau == pytest.approx((1 / 3 + 2 / math.sqrt(6)) / 2)


def test_pairs_and_prompts_skipped_are_counted_with_the_reason():
    m = agreement({**DATA, "E": [(0, None), (1, 2.0), (2, None)]})
    # humans ranked 3 (A) + 6 (B) + 0 (C) + 1 (D) + 3 (E) pairs differently; 7 had both replies scored
    assert (m.ranked_pairs, m.pairs, m.pairs_unscored) == (13, 7, 6)
    assert (m.prompts, m.prompts_compared, m.prompts_one_rank, m.prompts_unscored) == (5, 3, 1, 1)


def test_unscored_replies_are_excluded_not_scored_zero():
    with_none = agreement({"p": [(0, None), (1, 3.0), (2, 1.0)]})
    with_nan = agreement({"p": [(0, float("nan")), (1, 3.0), (2, 1.0)]})
    as_zero = agreement({"p": [(0, 0.0), (1, 3.0), (2, 1.0)]})
    assert with_none == with_nan
    assert (with_none.pairs, with_none.agree, with_none.unscored, with_none.pairwise_accuracy) == (1, 1, 1, 1.0)
    assert (as_zero.pairs, as_zero.agree, as_zero.pairwise_accuracy) == (3, 1, pytest.approx(1 / 3))


def test_perfect_reversed_and_empty():
    perfect = agreement({"a": [(0, 5), (1, 4), (2, 1)], "b": [(1, 2), (0, 3)]})
    assert (perfect.pairwise_accuracy, perfect.spearman, perfect.kendall_tau) == (1.0, 1.0, 1.0)
    reversed_ = agreement({"a": [(0, 1), (1, 4), (2, 5)]})
    assert (reversed_.pairwise_accuracy, reversed_.spearman, reversed_.kendall_tau) == (0.0, -1.0, -1.0)
    empty = agreement({"only-ties": [(0, 1.0), (0, 2.0)], "unscored": [(0, None), (1, None)]})
    assert empty.pairs == 0 and empty.pairwise_accuracy is None and empty.spearman is None and empty.unscored == 2


# --- the CLI on a real tiny model ------------------------------------------------------------------------------------
SHORT_JUDGE = "Rate the reply from 0 to 5.\nQuestion: {instruction}\nReply: {response}\nEnd with a line Score: N"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    """A random tiny Llama given 40 real optimiser steps (4 prompts each) to answer the short judge prompt with
    'Score: <0-5>' (the digit random), so it emits parseable, arbitrary verdicts."""
    from flywheel.backends.models import load, save_atomically
    from flywheel.stages.seeds import load_seed_data
    from tests.helpers.models import save_random_tiny_model, teach_score_format

    root = tmp_path_factory.mktemp("judge")
    model, tok = load(save_random_tiny_model(root / "random"), "cpu")
    data = load_seed_data("tests/fixtures/seeds/oasst.jsonl")
    prompts = [SHORT_JUDGE.format(instruction=p.instruction, response=r.text) for p in data.ranked for r in p.replies]
    heads = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    teach_score_format(model, tok, heads, steps=40)
    save_atomically(model, tok, root / "judge")
    (root / "judge.txt").write_text(SHORT_JUDGE)
    return root


def _eval(capsys, root, *extra):
    argv = ["eval", "judge", "--data", "tests/fixtures/seeds/oasst.jsonl", *extra,
            f"judge.template={root / 'judge.txt'}", "judge.samples=3", "judge.max_new_tokens=6", "judge.batch_size=8", "run.device=cpu"]
    code = main(argv)
    return code, capsys.readouterr().out


@pytest.mark.slow  # a tiny model taught the verdict format
def test_cli_scores_every_ranked_reply_and_counts_right(judge_model, capsys):
    code, out = _eval(capsys, judge_model, "--model", str(judge_model / "judge"), "--json")
    assert code == 0
    result = json.loads(out)
    replies, m = result["replies"], result["metrics"]
    # the fixture: 5 trees with 14 first-turn replies (one deleted reply skipped), one of them unranked
    assert (m["prompts"], m["replies"], m["unranked"]) == (5, 14, 1)
    assert result["judge"]["samples_total"] == 13 * 3
    assert sum(1 for r in replies if r["human_rank"] is None and not r["sample_scores"]) == 1  # not judged
    for r in replies:  # a reply's score is the mean of its valid samples, or None with the reasons
        valid = [s for s in r["sample_scores"] if s is not None]
        assert r["score"] == (pytest.approx(sum(valid) / len(valid)) if valid else None)
        assert len(r["errors"]) == len(r["sample_scores"]) - len(valid)
    assert m["unscored"] == sum(1 for r in replies if r["human_rank"] is not None and r["score"] is None)
    # recount the pairs by brute force from the per-reply scores
    agree = disagree = ties = 0
    by_prompt = {}
    for r in replies:
        if r["human_rank"] is not None and r["score"] is not None:
            by_prompt.setdefault(r["prompt_id"], []).append((r["human_rank"], r["score"]))
    for scored in by_prompt.values():
        for (ra, sa), (rb, sb) in combinations(scored, 2):
            if ra != rb:
                ties += sa == sb
                agree += sa != sb and (sa > sb) == (ra < rb)
                disagree += sa != sb and (sa > sb) != (ra < rb)
    assert (m["agree"], m["disagree"], m["judge_ties"]) == (agree, disagree, ties)
    assert m["pairs"] > 0 and m["pairwise_accuracy"] == (pytest.approx(agree / (agree + disagree))
                                                          if agree + disagree else None)
    assert "reported separately" in result["ties"]


@pytest.mark.slow  # a tiny model taught the verdict format
def test_cli_with_an_untrained_model_excludes_what_it_cannot_score(judge_model, capsys):
    code, out = _eval(capsys, judge_model, "--model", str(judge_model / "random"), "--json")
    m = json.loads(out)["metrics"]
    assert code == 0 and m["replies"] == 14 and m["unranked"] == 1
    scored = 13 - m["unscored"]  # random weights seldom write a verdict; what has none is left out, not scored 0
    assert m["pairs"] <= scored * (scored - 1) // 2
    if m["unscored"] == 13:
        assert m["pairs"] == 0 and m["pairwise_accuracy"] is None and m["spearman"] is None


@pytest.mark.slow  # a tiny model taught the verdict format
def test_cli_finds_a_registered_model_by_name_and_prints_a_table(judge_model, capsys, tmp_path):
    reg_root = tmp_path / "reg"
    with Registry(reg_root) as reg:
        for model_id, path in (("sft-old", tmp_path / "gone"), ("sft-new", judge_model / "judge")):
            reg.register_model(model_id=model_id, run_id="r", name="M1", kind="sft", iteration=0, parent_id=None,
                               path=str(path), stage_run_id=model_id, config_hash="c", metrics={}, created_at=now())
    code, out = _eval(capsys, judge_model, "--model", "M1", "--registry", str(reg_root))
    assert code == 0, out
    assert "pairwise accuracy (judge ties excluded)" in out and "judge ties (reported separately)" in out
    code, out = _eval(capsys, judge_model, "--model", "M7", "--registry", str(reg_root))
    assert code == 2 and "names there: M1" in out
    code, out = _eval(capsys, judge_model, "--model", "M1", "--registry", str(tmp_path / "none"))
    assert code == 2 and "no registry at" in out
    code, out = _eval(capsys, judge_model, "--model", str(tmp_path))
    assert code == 2 and "holds no config.json" in out


@pytest.mark.slow  # a tiny model taught the verdict format
def test_cli_names_a_missing_template_before_loading_the_model(judge_model, capsys, tmp_path):
    code = main(["eval", "judge", "--data", "tests/fixtures/seeds/oasst.jsonl", "--model", str(judge_model / "judge"),
                 f"judge.template={tmp_path / 'none.txt'}"])
    assert code == 2 and f"judge.template: template file not found: {tmp_path / 'none.txt'}" in capsys.readouterr().out


def test_cli_refuses_data_without_rankings(capsys, tmp_path):
    code = main(["eval", "judge", "--data", "tests/fixtures/seeds/alpaca.json", "--model", str(tmp_path)])
    assert code == 2 and "no human-ranked replies" in capsys.readouterr().out


def test_cli_says_how_many_pairs_it_scored_and_what_it_skipped(monkeypatch, capsys, tmp_path):
    """The report counts the pairs actually scored among those humans ranked differently, and names what was
    skipped: here 1 of 12 pairs scored, and the fixture's tree with no ranked reply."""
    import flywheel.analysis.eval_judge as ej

    def judge_two(cfg, ranked, model_path, device=None):  # the judge scores two replies of the first tree only
        replies = [ej.JudgedReply(key, j, r.rank, None) for key, p in zip(ej.prompt_keys(ranked), ranked)
                   for j, r in enumerate(p.replies)]
        replies[0].score, replies[1].score = 5.0, 1.0
        return replies

    monkeypatch.setattr(ej, "judge_ranked", judge_two)
    monkeypatch.setattr(ej, "resolve_model", lambda spec, root: {"path": spec, "model_id": None, "name": None})
    code = main(["eval", "judge", "--data", "tests/fixtures/seeds/oasst.jsonl", "--model", "m", "--json"])
    result = json.loads(capsys.readouterr().out)
    m = result["metrics"]
    assert code == 0 and (m["pairs"], m["agree"], m["ranked_pairs"], m["pairs_unscored"]) == (1, 1, 12, 11)
    assert result["records_without_ranks"] == 1
    from rich.console import Console

    monkeypatch.setattr("flywheel.cli.eval.console", Console(width=400))  # one line per row
    assert main(["eval", "judge", "--data", "tests/fixtures/seeds/oasst.jsonl", "--model", "m"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "0.0% of 1 scored pairs" in out and "1 scored; 11 skipped: a reply with no valid judge score" in out
    assert "trees in the file with no human-ranked reply: not judged" in out
    assert "pairs humans ranked differently" in out and "12" in out
