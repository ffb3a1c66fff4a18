"""The seed file format, M1's IFT/EFT data (synthetic, and from human rankings), and the import into the registry."""

import json
from collections import Counter

import pytest

from flywheel.config import load_config
from flywheel.registry import Registry
from flywheel.registry.reads import ranked_from_registry, seeds_from_registry
from flywheel.stage import stage_run_id
from flywheel.stages.bootstrap import import_seeds
from flywheel.stages.score_parser import parse_score
from flywheel.stages.seeds import (
    RankedPrompt,
    RankedReply,
    SeedFormatError,
    balance_scores,
    eft_examples,
    eft_from_rankings,
    ift_examples,
    load_seeds,
    pretrain_corpus,
    rank_points,
)
from flywheel.training.sft import sft_examples


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "response": "b"}\nnot json\n', ":2: not valid JSON"),
        ('["a", "b"]\n', ":1: expected a JSON object"),
        ('{"instruction": "a"}\n', ":1: 'response' must be a non-empty string"),
        ('{"instruction": "  ", "response": "b"}\n', ":1: 'instruction' must be a non-empty string"),
        ("\n\n", "no seed records"),
    ],
)
def test_malformed_seed_files_name_the_line(tmp_path, content, message):
    path = tmp_path / "seeds.jsonl"
    path.write_text(content)
    with pytest.raises(SeedFormatError) as e:
        load_seeds(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_shipped_seeds_load():
    seeds = load_seeds("seeds/demo.jsonl")
    assert len(seeds) >= 24 and len({s.id for s in seeds}) == len(seeds)
    assert len(ift_examples(seeds)) == len(seeds)


def test_eft_targets_are_what_the_parser_reads():
    seeds = load_seeds("seeds/demo.jsonl")[:10]
    template = open("prompts/judge.txt").read()
    examples = eft_examples(seeds, template, seed=0)
    assert len(examples) == 3 * len(seeds)
    scores = [parse_score(e["completion"]).score for e in examples]
    assert sorted(set(scores)) == [0.0, 2.0, 5.0]
    assert all(seeds[0].instruction in e["prompt"] for e in examples[:3])


def test_pretrain_corpus_is_deterministic():
    seeds = load_seeds("seeds/demo.jsonl")
    assert pretrain_corpus(seeds, ["t"], 1) == pretrain_corpus(seeds, ["t"], 1)
    assert pretrain_corpus(seeds, ["t"], 1) != pretrain_corpus(seeds, ["t"], 2)


# --- EFT from human rankings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ranks, points", [
    ([0, 1], [5, 2]),
    ([0, 1, 2], [5, 3, 2]),
    ([0, 1, 2, 3], [5, 4, 3, 2]),
    ([0, 1, 2, 3, 4], [5, 4, 3, 3, 2]),  # 5 - round_half_up(3 * position / 4): 0.75 -> 1, 1.5 -> 2, 2.25 -> 2
    ([0, 0, 1], [5, 5, 2]),              # tied ranks share points
    ([1, 3, 7], [5, 3, 2]),              # gaps do not matter, only the order
    ([0], [5]),
])
def test_rank_points(ranks, points):
    assert [rank_points(r, ranks) for r in ranks] == points


def test_balance_caps_a_dominant_score_at_the_median_and_keeps_order():
    examples = [(4, {"i": i}) for i in range(10)] + [(2, {"i": 10}), (2, {"i": 11}), (0, {"i": 12}),
                                                     (0, {"i": 13}), (0, {"i": 14})]
    kept = balance_scores(examples, seed=0)
    counts = Counter(p for p, _ in kept)
    assert counts == {4: 3, 2: 2, 0: 3}  # median of (10, 2, 3) is 3
    assert [e["i"] for _, e in kept] == sorted(e["i"] for _, e in kept)
    assert balance_scores(examples, seed=0) == kept and balance_scores(examples, seed=1) != kept
    assert balance_scores([], seed=0) == []


def _ranked(n_prompts: int, ranks: list) -> list[RankedPrompt]:
    return [RankedPrompt(f"p{i}", f"Question {i}?", tuple(RankedReply(f"answer {i}.{j}", r) for j, r in
                                                           enumerate(ranks))) for i in range(n_prompts)]


def test_eft_from_rankings_scores_ranked_replies_and_off_topic_ones():
    template = open("prompts/judge.txt").read()
    ranked = _ranked(4, [0, 1, 2, None])
    examples = eft_from_rankings(ranked, template, seed=0, balance=False)
    assert len(examples) == 4 * 4  # 3 ranked replies + 1 off-topic per prompt; the unranked one is not used
    scores = [parse_score(e["completion"]).score for e in examples]
    assert scores[:4] == [5.0, 3.0, 2.0, 0.0]
    assert "Question 0?" in examples[3]["prompt"] and "answer 0." not in examples[3]["prompt"]
    assert all("answer 0.3" not in e["prompt"] for e in examples)
    assert eft_from_rankings(ranked, template, seed=0) == examples  # 5, 3, 2, 0 equally often: nothing to cut


def test_eft_from_rankings_rebalances_when_one_score_dominates():
    template = "{instruction} || {response}"

    def scores(ranked, **kw):
        return Counter(parse_score(e["completion"]).score for e in eft_from_rankings(ranked, template, 0, **kw))

    dominated = _ranked(3, [0, 1, 1, 1])  # per prompt: one 5, three tied 2s, one off-topic 0
    assert scores(dominated, balance=False) == {5.0: 3, 2.0: 9, 0.0: 3}
    assert scores(dominated) == {5.0: 3, 2.0: 3, 0.0: 3}  # 2 is cut to the median count
    ranked = _ranked(6, [0]) + _ranked(2, [0, 1])
    ranked = [RankedPrompt(f"{p.id}-{k}", f"{p.instruction} {k}", p.replies) for k, p in enumerate(ranked)]
    assert scores(ranked) == scores(ranked, balance=False) == {5.0: 8, 0.0: 8, 2.0: 2}  # a rare score is not cut


# --- import and M1's data through the registry ------------------------------------------------------------------------
def _cfg(tmp_path, path, fmt="auto"):
    return load_config(None, [f"registry.root={tmp_path / 'reg'}", f"seeds.path={path}", f"seeds.format={fmt}"])


def test_import_writes_prompts_and_ranked_replies_and_is_a_no_op_when_unchanged(tmp_path):
    cfg = _cfg(tmp_path, "tests/fixtures/seeds/oasst.jsonl")
    first = import_seeds(cfg, "run-a")
    again = import_seeds(cfg, "run-a")
    assert not first.skipped and again.skipped and again.stage_run_id == first.stage_run_id
    assert first.stats["seeds"] == 5 and first.stats["seed_responses"] == 14 and first.stats["format"] == "oasst"
    with Registry(cfg.registry.root) as reg:
        assert reg.scalar("SELECT count(*) FROM prompts WHERE source = 'seed'") == 5
        rows = reg.rows("SELECT p.seed_id, r.text, r.human_rank FROM seed_responses r JOIN prompts p USING (prompt_id) "
                        "ORDER BY p.seed_id, r.human_rank NULLS LAST")
        assert len(rows) == 14 and sum(r["human_rank"] is None for r in rows) == 1
        assert [r["human_rank"] for r in rows if r["seed_id"] == "t-haiku"] == [0, 1, 2, 3]
        best = {r["seed_id"]: r["text"] for r in rows if r["human_rank"] == 0}
        refs = dict(reg.con.execute("SELECT seed_id, reference FROM prompts").fetchall())
        assert best == refs  # the IFT answer is the rank-0 reply of the same prompt
        examples, counts = sft_examples(reg, first.stage_run_id, "{instruction} || {response}", eft=True, seed=0)
        assert counts["ift"] == 5 and counts["eft_source"] == "human_rankings"
        assert counts["eft"] == 13 + 5 == len(examples) - 5  # 13 ranked replies + 1 off-topic per prompt
        assert counts["eft_scores"] == {"0": 5, "2": 5, "3": 2, "4": 1, "5": 5}
        assert sft_examples(reg, first.stage_run_id, "{instruction}{response}", eft=False, seed=0)[1]["eft"] == 0
    # a changed file is a new import; the same seeds in another format are too
    assert import_seeds(_cfg(tmp_path, "tests/fixtures/seeds/alpaca.json"), "run-a").stage_run_id != first.stage_run_id


def test_an_import_without_rankings_keeps_its_key_and_synthetic_eft(tmp_path):
    cfg = _cfg(tmp_path, "seeds/demo.jsonl", "flywheel")
    result = import_seeds(cfg, "run-a")
    seeds = load_seeds("seeds/demo.jsonl")
    assert result.stage_run_id == stage_run_id("seeds", {"seeds": [s.__dict__ for s in seeds]})  # as before formats
    with Registry(cfg.registry.root) as reg:
        assert reg.scalar("SELECT count(*) FROM seed_responses") == 0
        examples, counts = sft_examples(reg, result.stage_run_id, "{instruction} || {response}", eft=True, seed=0)
    assert counts["eft_source"] == "synthetic" and counts["eft"] == 3 * len(seeds)
    assert counts["eft_scores"] == {"0": len(seeds), "2": len(seeds), "5": len(seeds)}


def test_a_ranked_prompt_without_a_rank_0_reply_gets_a_prompt_row_without_reference(tmp_path):
    trees = [json.loads(line) for line in open("tests/fixtures/seeds/oasst.jsonl")][:2]
    for reply, rank in zip(trees[1]["prompt"]["replies"], [1, 2, None]):
        reply["rank"] = rank  # no rank 0: no IFT seed, but its ranking still counts for EFT
    path = tmp_path / "trees.jsonl"
    path.write_text("".join(json.dumps(t) + "\n" for t in trees))
    cfg = _cfg(tmp_path, path)
    result = import_seeds(cfg, "run-a")
    assert (result.stats["seeds"], result.stats["prompts"], result.stats["seed_responses"]) == (1, 2, 6)
    with Registry(cfg.registry.root) as reg:
        assert reg.rows("SELECT seed_id, reference IS NULL AS no_ref FROM prompts ORDER BY seed_id") == [
            {"seed_id": "t-basil", "no_ref": False}, {"seed_id": "t-hash", "no_ref": True}]
        assert [s.id for s in seeds_from_registry(reg, result.stage_run_id)] == ["t-basil"]
        ranked = {p.id: p for p in ranked_from_registry(reg, result.stage_run_id)}
        assert [r.rank for r in ranked["t-hash"].replies] == [1, 2, None]
        assert ranked["t-hash"].instruction == trees[1]["prompt"]["text"]
        assert [r.rank for r in ranked["t-basil"].replies] == [0, 1, 2]
