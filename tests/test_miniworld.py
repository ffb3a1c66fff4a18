"""The mini-world's task (flywheel/analysis/miniworld.py) and the pipeline features it uses: a prompt pool instead of
self-instruct, extra pretraining text, digit-level tokens."""


import pytest

from flywheel.analysis import miniworld as mw
from flywheel.backends.models import build_tokenizer
from flywheel.config import load_config
from flywheel.registry import Registry
from flywheel.stages.seeds import eft_from_rankings, load_seed_data

SIZES = mw.WorldSizes(corpus_docs=50, lines_per_doc=5, seeds=30, pool=40, test=25)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mw.SortWorld(SIZES, seed=3).write(tmp_path_factory.mktemp("world"))


def test_splits_are_disjoint_and_the_test_set_never_trains(world):
    test = {r["digits"] for r in mw.read_jsonl(world["test"])}
    seeds = {mw.parse_prompt(r["prompt"]["text"]) for r in mw.read_jsonl(world["seeds"])}
    pool = {mw.parse_prompt(r["prompt"]) for r in mw.read_jsonl(world["pool"])}
    text = world["corpus"].read_text()
    corpus = {line.split(">")[0] for line in text.split() if ">" in line}
    corpus |= {mw.parse_prompt(line) for line in text.splitlines() if mw.parse_prompt(line)}
    assert (len(test), len(seeds), len(pool)) == (25, 30, 40)
    assert not test & seeds and not test & pool and not seeds & pool and not test & corpus
    assert len(corpus) > 150  # 250 lists of the task (short ones repeat), not empty
    for r in mw.read_jsonl(world["test"]) + mw.read_jsonl(world["pool"]):
        assert r["reference"] == "".join(sorted(mw.parse_prompt(r["prompt"])))
        assert SIZES.min_len <= len(r["reference"]) <= SIZES.max_len


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(world, tmp_path):
    again = mw.SortWorld(SIZES, seed=3).write(tmp_path / "again")
    other = mw.SortWorld(SIZES, seed=4).write(tmp_path / "other")
    for name in world:
        assert again[name].read_bytes() == world[name].read_bytes()
        assert other[name].read_bytes() != world[name].read_bytes()


def test_answers_are_read_exactly():
    assert mw.final_answer("72941>12479") == "12479"
    assert mw.final_answer("12479") == "12479"
    assert mw.final_answer("72941>124 79") is None and mw.final_answer("72941>") is None
    assert mw.exact_match("Sort the digits 72941.", "72941>12479", None) == 1.0
    assert mw.exact_match("Sort the digits 72941.", "72941>12749", "12479") == 0.0
    with pytest.raises(ValueError, match="not a sorting prompt"):
        mw.exact_match("What is 2+2?", "4", None)


def test_near_misses_are_wrong_but_plausible():
    import random

    rng = random.Random(0)
    for digits in ["321", "90817", "555", "123456789"]:
        for _ in range(20):
            miss = mw.near_miss(digits, rng)
            assert miss.isdigit() and not mw.is_correct(miss, "".join(sorted(digits)))
            assert abs(len(miss) - len(digits)) <= 1


def test_seeds_load_as_ift_and_teach_the_judge_5_2_0(world):
    data = load_seed_data(world["seeds"], "auto")
    assert data.format == "oasst" and len(data.ift) == 30 and len(data.ranked) == 30
    assert all(mw.is_correct(s.response, "".join(sorted(mw.parse_prompt(s.instruction)))) for s in data.ift)
    eft = eft_from_rankings(data.ranked, "Q: {instruction}\nA: {response}", seed=0)
    assert {e["completion"].rsplit("Score: ", 1)[1] for e in eft} == {"5", "2", "0"}


def test_split_digits_gives_each_digit_its_own_token():
    texts = ["1234>1234\n5678>5678"] * 50 + ["Sort the digits 4321."] * 50
    split = build_tokenizer(texts, 300, split_digits=True)
    merged = build_tokenizer(texts, 300)
    assert split.tokenize("72941>12479").count(">") == 1
    assert all(len(t.lstrip("Ġ")) <= 1 for t in split.tokenize("72941>12479") if any(c.isdigit() for c in t))
    assert any(len(t) > 1 and t.isdigit() for t in merged.tokenize("1234>1234"))


def test_prompts_file_draws_fresh_prompts_each_iteration(world, tmp_path):
    from flywheel.stages.self_instruct import self_instruct

    cfg = load_config(None, [f"registry.root={tmp_path}", f"self_instruct.prompts_file={world['pool']}",
                             "self_instruct.num_prompts=15"])
    first = self_instruct(cfg, "r", 1, "m1", "seeds-none", [])
    second = self_instruct(cfg, "r", 2, "m2", "seeds-none", [first.stage_run_id])
    third = self_instruct(cfg, "r", 3, "m3", "seeds-none", [first.stage_run_id, second.stage_run_id])
    with Registry(tmp_path) as reg:
        rows = {sid: reg.rows("SELECT text, reference, source FROM prompts WHERE stage_run_id = ?", [sid])
                for sid in (first.stage_run_id, second.stage_run_id, third.stage_run_id)}
    texts = [[r["text"] for r in v] for v in rows.values()]
    assert [len(t) for t in texts] == [15, 15, 10]  # 40 in the pool: the third iteration gets what is left
    assert len(set(sum(texts, []))) == 40
    assert all(r["source"] == "file" and r["reference"] == "".join(sorted(mw.parse_prompt(r["text"])))
               for v in rows.values() for r in v)
    again = self_instruct(cfg, "r", 1, "m1", "seeds-none", [])
    assert again.skipped and again.stage_run_id == first.stage_run_id


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    ("", "holds no prompts"),
    ('{"prompt": "ok"}\nnot json\n', ":2 is not JSON"),
    ('{"text": "no prompt key"}\n', ":1 needs a non-empty string 'prompt'"),
])
def test_a_bad_prompts_file_is_named(tmp_path, content, message):
    from flywheel.stages.self_instruct import read_prompts_file

    path = tmp_path / "pool.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_prompts_file(path)


def test_the_oracle_pairs_right_over_wrong_and_pair_quality_counts_it(tmp_path):
    """The rule-oracle variant's path on known candidates: the exact_match rule (a python checker) through the real
    reward and pairs stages; `pair_quality` and `candidate_accuracy` read back what the run used."""
    from flywheel.analysis.experiment import candidate_accuracy, pair_quality
    from flywheel.registry import now
    from flywheel.stage import run_stage
    from flywheel.stages.pairs import build_pairs
    from flywheel.stages.reward import reward

    cfg = load_config(None, [f"registry.root={tmp_path}",
                             "reward.rules=[{name: exact_match, kind: python, checker: 'flywheel.analysis.miniworld:exact_match'}]",
                             "reward.weights={exact_match: 1.0}"])
    answers = {"312": ["123", "132", "312"], "9055": ["0559", "0559", "5590"], "777": ["77", "777", "7777"],
               "41": ["41", "14x", "41"]}  # the last has no right answer: no pair

    def generate(reg, sid):
        common = dict(run_id="r", iteration=1, config_hash="h", created_at=now())
        for digits, texts in answers.items():
            reg.insert("prompts", [dict(prompt_id=f"p{digits}", source="file", text=mw.prompt_of(digits),
                                        reference=mw.solution_of(digits), seed_id=None, few_shot_ids=None, kept=True,
                                        drop_reason=None, model_id=None, stage_run_id="si", **common)])
            reg.insert("candidates", [dict(candidate_id=f"c{digits}-{k}", prompt_id=f"p{digits}", sample_index=k,
                                           text=t, num_tokens=len(t), finish_reason="stop", model_id="m",
                                           backend="transformers", sampling={}, seed=0, stage_run_id=sid, **common)
                                      for k, t in enumerate(texts)])
        return {}

    gen = run_stage(cfg, "generate", "r", 1, "m", {"test": 1}, generate)
    rewards = reward(cfg, "r", 1, gen.stage_run_id, "m1", "pt")
    pairs = build_pairs(cfg, "r", 1, None, rewards.stage_run_id)
    assert pairs.stats["pairs"] == 3
    with Registry(tmp_path) as reg:
        assert pair_quality(reg, "r", 1) == {"pairs": 3, "pair_accuracy": 1.0, "pair_inverted": 0.0,
                                                  "chosen_correct": 1.0}
        assert candidate_accuracy(reg, "r", 1) == pytest.approx(4 / 12)


@pytest.mark.parametrize("override, message", [
    ("model.tiny.corpus=no/such/corpus.txt", "model.tiny.corpus: file not found"),
    ("self_instruct.prompts_file=no/such/pool.jsonl", "self_instruct.prompts_file: file not found"),
])
def test_flywheel_run_names_a_missing_world_file_before_running(override, message, tmp_path, capsys):
    from flywheel.cli import main as cli_main

    assert cli_main(["run", "--config", "configs/tiny.yaml", f"registry.root={tmp_path}", override]) == 2
    assert message in capsys.readouterr().out
    assert not (tmp_path / "flywheel.duckdb").exists()  # nothing ran
