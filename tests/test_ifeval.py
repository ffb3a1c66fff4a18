"""IFEval's checks (flywheel/analysis/ifeval.py), `flywheel eval ifeval` on a tiny model, and the instruction-following
world (flywheel/analysis/ifworld.py)."""

import json
import os
import subprocess
import sys

import pytest

from flywheel.analysis import ifeval as ife
from flywheel.analysis import ifworld as ifw
from flywheel.cli import main
from flywheel.registry import Registry, now
from tests.helpers import REPO

SAMPLE = "tests/fixtures/ifeval/sample.jsonl"        # IFEval format, kwargs with nulls as the published data set
RESPONSES = "tests/fixtures/ifeval/responses.jsonl"  # a response per key and its strict / loose results, by hand

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# For each of IFEval's 25 instruction ids: kwargs, and a response that follows the instruction.
FOLLOWED = {
    "keywords:existence": ({"keywords": ["ocean", "salt"]}, "The ocean is full of salt."),
    "keywords:frequency": ({"keyword": "sea", "frequency": 2, "relation": "at least"}, "The sea is wide. The sea is deep."),
    "keywords:forbidden_words": ({"forbidden_words": ["water"]}, "The ocean is wide."),
    "keywords:letter_frequency": ({"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "The sea is wide."),
    "language:response_language": ({"language": "de"}, "Das Meer ist sehr groß und tief, und es gibt viele Fische darin."),
    "length_constraints:number_sentences": ({"num_sentences": 2, "relation": "at least"},
                                            "Dr. Smith went home. He was tired."),
    "length_constraints:number_paragraphs": ({"num_paragraphs": 2}, "First part.\n***\nSecond part."),
    "length_constraints:number_words": ({"num_words": 5, "relation": "less than"}, "Short and sweet."),
    "length_constraints:nth_paragraph_first_word": ({"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "also"},
                                                    "The sea is big.\n\nAlso it is deep."),
    "detectable_content:number_placeholders": ({"num_placeholders": 2}, "Dear [name], see you at [place]."),
    "detectable_content:postscript": ({"postscript_marker": "P.P.S"}, "Hello.\n\nP.P.S. Bye."),
    "detectable_format:number_bullet_lists": ({"num_bullets": 2}, "* one\n* two"),
    "detectable_format:constrained_response": ({}, "My answer is maybe."),
    "detectable_format:number_highlighted_sections": ({"num_highlights": 2}, "A *first* and a *second* part."),
    "detectable_format:multiple_sections": ({"section_spliter": "Section", "num_sections": 2},
                                            "Section 1\nhello\nSection 2\nworld"),
    "detectable_format:json_format": ({}, '```json\n{"a": 1}\n```'),
    "detectable_format:title": ({}, "<<A Title>>\nText."),
    "combination:two_responses": ({}, "One answer.\n******\nAnother answer."),
    "combination:repeat_prompt": ({"prompt_to_repeat": "Say hi."}, "Say hi. Hi!"),
    "startend:end_checker": ({"end_phrase": "Any other questions?"}, "The sea is wide. Any other questions?"),
    "change_case:capital_word_frequency": ({"capital_frequency": 3, "capital_relation": "at least"},
                                           "THE SKY is BLUE today."),
    "change_case:english_capital": ({}, "THE SEA IS VERY WIDE AND DEEP AND FULL OF FISH."),
    "change_case:english_lowercase": ({}, "the sea is very wide and deep and full of fish."),
    "punctuation:no_comma": ({}, "No commas here."),
    "startend:quotation": ({}, '"All of it quoted."'),
}


def _item(iid, kwargs, prompt="Say hi."):
    return ife.IFEvalItem(1, prompt, (iid,), (kwargs,))


# --- the checks ----------------------------------------------------------------------------------------------------
def test_all_25_instruction_ids_build_and_check_offline():
    assert sorted(FOLLOWED) == ife.instruction_ids() and len(FOLLOWED) == 25
    for iid, (kwargs, response) in FOLLOWED.items():
        checked = ife.check_item(_item(iid, kwargs), response)
        assert checked.strict == [True] and checked.loose == [True] and not checked.errors, iid


def test_the_two_punkt_checkers_count_right():
    sentences = "length_constraints:number_sentences"
    text = "Dr. Smith went home. He was tired. Was he?"  # punkt keeps "Dr." in its sentence: 3 sentences
    assert ife.check_item(_item(sentences, {"num_sentences": 3, "relation": "at least"}), text).strict == [True]
    assert ife.check_item(_item(sentences, {"num_sentences": 3, "relation": "less than"}), text).strict == [False]
    capitals = "change_case:capital_word_frequency"
    text = "THE SKY is BLUE today."  # THE, SKY, BLUE
    assert ife.check_item(_item(capitals, {"capital_frequency": 3, "capital_relation": "at least"}), text).strict == [True]
    assert ife.check_item(_item(capitals, {"capital_frequency": 3, "capital_relation": "less than"}), text).strict == [False]


def test_punkt_data_is_written_from_the_package_in_a_fresh_folder(tmp_path):
    """A clean process, a folder with no NLTK data: the punkt checker works, offline, after ensure_nltk_data."""
    env = {**os.environ, "FLYWHEEL_NLTK_DATA": str(tmp_path / "nltk"), "NLTK_DATA": str(tmp_path / "empty"),
           "HF_HUB_OFFLINE": "1"}
    code = ("from flywheel.analysis import ifeval as f\n"
            "item = f.IFEvalItem(1, 'p', ('length_constraints:number_sentences',), "
            "({'num_sentences': 2, 'relation': 'at least'},))\n"
            "print(f.check_item(item, 'One. Two.').strict)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[True]"
    english = tmp_path / "nltk" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in english.iterdir()) == ["abbrev_types.txt", "collocations.tab", "ortho_context.tab",
                                                         "sent_starters.txt"]
    assert not [p for p in english.parent.iterdir() if p.name != "english"]  # no temporary folder left behind


def test_loose_variants_are_ifevals_eight_in_order():
    assert ife.loose_variants("**Intro**\nbody *x*\nlast") == [
        "**Intro**\nbody *x*\nlast", "Intro\nbody x\nlast", "body *x*\nlast", "**Intro**\nbody *x*", "body *x*",
        "body x\nlast", "Intro\nbody x", "body x"]


def test_strict_and_loose_match_hand_made_answers():
    items = ife.read_ifeval(SAMPLE)
    expected = [json.loads(line) for line in (REPO / RESPONSES).read_text().splitlines()]
    assert [it.key for it in items] == [e["key"] for e in expected]
    for it, e in zip(items, expected):
        checked = ife.check_item(it, e["response"])
        assert (checked.strict, checked.loose) == (e["strict"], e["loose"]), it.key
    # the nulls of the published format are dropped: only the checker's own arguments are passed
    assert items[1].kwargs[0] == {"num_words": 20, "relation": "less than"} and items[0].kwargs == ({}, {})
    # a blank response follows nothing, though the checker alone would pass it ("fewer than 50 words")
    assert ife.build_instruction(*items[4].instruction_id_list, items[4].kwargs[0], items[4].prompt).check_following("")


def test_aggregation_on_the_fixture():
    items = ife.read_ifeval(SAMPLE)
    expected = [json.loads(line) for line in (REPO / RESPONSES).read_text().splitlines()]
    m = ife.aggregate([ife.check_item(it, e["response"]) for it, e in zip(items, expected)])
    # by hand: 6 prompts, 9 instructions; strict follows 4 instructions and all of 1 prompt (key 6), loose 7 and 4
    assert (m["prompts"], m["instructions"]) == (6, 9)
    assert (m["prompt_strict_followed"], m["prompt_loose_followed"]) == (1, 4)
    assert (m["instruction_strict_followed"], m["instruction_loose_followed"]) == (4, 7)
    assert m["prompt_strict"] == pytest.approx(1 / 6) and m["instruction_loose"] == pytest.approx(7 / 9)
    assert m["per_instruction"]["punctuation:no_comma"] == {"n": 2, "strict": 0.5, "loose": 1.0}
    assert m["per_instruction"]["startend:end_checker"] == {"n": 1, "strict": 0.0, "loose": 1.0}
    assert m["per_category"]["length_constraints"] == {"n": 3, "strict": 2 / 3, "loose": 2 / 3}


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x", "instruction_id_list": ["no:such_id"], "kwargs": [{}]}', "unknown instruction id"),
    ('{"prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}, {}]}', "list of 1 objects"),
    ('{"prompt": "x", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": 3}]}', "bad kwargs"),
    ('{"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}', "'prompt' must be"),
    ("not json", "not valid JSON"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as e:
        ife.read_ifeval(path)
    assert f"{path}:2" in str(e.value)


# --- `flywheel eval ifeval` on a tiny model -------------------------------------------------------------------------

def _run(capsys, *args):
    code = main(["eval", "ifeval", "--data", SAMPLE, "--max-new-tokens", "8", "--batch-size", "4", "run.device=cpu",
                 *args])
    return code, capsys.readouterr().out


def test_cli_generates_checks_stores_and_a_second_call_is_a_no_op(tiny_model_path, tmp_path, capsys, monkeypatch):
    reg_root, out = tmp_path / "reg", tmp_path / "result.json"
    code, text = _run(capsys, "--model", str(tiny_model_path), "--registry", str(reg_root), "--out", str(out))
    assert code == 0, text
    assert "prompt-level accuracy" in text and "instruction-level accuracy" in text and "per instruction id" in text
    result = json.loads(out.read_text())
    assert len(result["items"]) == 6 and result["metrics"]["prompts"] == 6 and result["metrics"]["instructions"] == 9
    for item in result["items"]:  # each prompt's stored result is the checkers' verdict on its stored response
        checked = ife.check_item(ife.IFEvalItem(item["key"], item["prompt"], tuple(item["instruction_id_list"]),
                                                tuple(item["kwargs"])), item["response"])
        assert (item["strict"], item["loose"]) == (checked.strict, checked.loose)
        assert item["num_tokens"] <= 8
    with Registry(reg_root, read_only=True) as reg:
        evals = reg.rows("SELECT * FROM evals")
        n_items = reg.scalar("SELECT count(*) FROM eval_items WHERE eval_id = ?", [evals[0]["eval_id"]])
    assert len(evals) == 1 and n_items == 6
    row = evals[0]
    assert row["benchmark"] == "ifeval" and row["model_id"] is None and row["data_sha256"] == ife.file_sha256(SAMPLE)
    assert json.loads(row["metrics"]) == result["metrics"] and json.loads(row["settings"])["max_new_tokens"] == 8

    # again, with the model registered under a name: the same weights, data and settings -> the stored result
    def no_generation(*a, **k):
        raise AssertionError("a stored evaluation generated again")

    monkeypatch.setattr(ife, "generate_responses", no_generation)
    with Registry(reg_root) as reg:
        reg.register_model(model_id="m1-id", run_id="r", name="M1", kind="sft", iteration=0, parent_id=None,
                           path=str(tiny_model_path), stage_run_id="s", config_hash="c", metrics={}, created_at=now())
    code, text = _run(capsys, "--model", "M1", "--registry", str(reg_root), "--json")
    assert code == 0, text
    again = json.loads(text)
    assert again["eval_id"] == row["eval_id"] and again["metrics"] == result["metrics"]
    assert [i["response"] for i in again["items"]] == [i["response"] for i in result["items"]]
    with Registry(reg_root, read_only=True) as reg:
        assert reg.scalar("SELECT count(*) FROM evals") == 1

    # other settings are another evaluation: it generates
    with pytest.raises(AssertionError, match="generated again"):
        _run(capsys, "--model", "M1", "--registry", str(reg_root), "--max-new-tokens", "9")


def test_cli_refuses_bad_data_before_loading_a_model(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "instruction_id_list": ["no:such_id"], "kwargs": [{}]}\n')
    code = main(["eval", "ifeval", "--data", str(bad), "--model", str(tmp_path), "--registry", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 2 and "unknown instruction id" in out


# --- the instruction-following world ---------------------------------------------------------------------------------
SIZES = ifw.IFWorldSizes(seeds=12, pool=15, test=12)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ifw.IFWorld(SIZES, seed=3).write(tmp_path_factory.mktemp("ifworld"))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_world_is_deterministic(world, tmp_path):
    again = ifw.IFWorld(SIZES, seed=3).write(tmp_path / "again")
    other = ifw.IFWorld(SIZES, seed=4).write(tmp_path / "other")
    for name in world:
        assert again[name].read_bytes() == world[name].read_bytes(), name
    assert other["test"].read_bytes() != world["test"].read_bytes()


def test_world_test_set_is_held_out_and_in_ifeval_format(world):
    test = ife.read_ifeval(world["test"])
    seeds = {r["prompt"]["text"] for r in _jsonl(world["seeds"])}
    pool = {r["prompt"] for r in _jsonl(world["pool"])}
    assert (len(test), len(seeds), len(pool)) == (12, 12, 15)
    assert not {t.prompt for t in test} & (seeds | pool) and not seeds & pool
    table = ifw.conflicts()
    for t in test:  # 1-3 instructions, no conflicting pair, each text the library's own
        assert 1 <= len(t.instruction_id_list) <= 3 and len(set(t.instruction_id_list)) == len(t.instruction_id_list)
        assert not any(b in table[a] for a in t.instruction_id_list for b in t.instruction_id_list if a != b)
        for iid, kw in zip(t.instruction_id_list, t.kwargs):
            assert ife.describe(iid, kw) in t.prompt


def test_world_seeds_follow_their_instructions_and_rank_the_worse_replies_below(world):
    from flywheel.stages.seeds import eft_from_rankings, load_seed_data

    trees = _jsonl(world["seeds"])
    for row in _jsonl(world["pool"]):  # a pool reference names the prompt's instructions, as the test set does
        ref = json.loads(row["reference"])
        assert 1 <= len(ref["instruction_id_list"]) == len(ref["kwargs"]) <= 3
        for iid, kw in zip(ref["instruction_id_list"], ref["kwargs"]):
            assert ife.describe(iid, kw) in row["prompt"]
    for tree in trees:
        replies = tree["prompt"]["replies"]
        assert replies[0]["rank"] == 0 and replies[0]["followed"] == 1.0
        assert len(replies) >= 2 and all(r["followed"] < 1 and r["rank"] > 0 for r in replies[1:])
        # the shares are the checkers' own, and rank follows them
        assert [r["rank"] for r in replies] == sorted(r["rank"] for r in replies)
    data = load_seed_data(world["seeds"])
    assert len(data.ift) == 12 and len(data.ranked) == 12
    assert {e["completion"].split()[-1] for e in eft_from_rankings(data.ranked, "{instruction} {response}", 0)} >= \
        {"5", "2", "0"}
    stats = json.loads(world["stats"].read_text())
    assert stats["seeds"]["kept"] == 12 and 0 < stats["seeds"]["yield"] <= 1
    assert stats["instruction_ids_unused"]["language:response_language"] == "responses are built in English only"
    eft = _jsonl(world["eft"])
    assert {e["points"] for e in eft} >= {5, 0} and all(e["completion"].endswith(f"Score: {e['points']}") for e in eft)


def test_world_responses_pass_the_checkers_in_every_split():
    rng_world = ifw.IFWorld(ifw.IFWorldSizes(seeds=3, pool=3, test=3), seed=11)
    splits, _ = rng_world.splits()
    for rows in splits.values():
        for wp, response in rows:
            assert ifw.fraction_followed(wp.prompt, response, wp.reference) == 1.0
            checked = ife.check_item(ife.IFEvalItem(0, wp.prompt, tuple(wp.ids), tuple(wp.kwargs)), response)
            assert checked.all_strict and checked.all_loose


def test_rule_checker_scores_the_share_of_instructions_followed():
    from flywheel.config import RuleRewardConfig
    from flywheel.signals import RewardError, make_rule

    reference = json.dumps({"instruction_id_list": ["punctuation:no_comma", "startend:end_checker"],
                            "kwargs": [{}, {"end_phrase": "Bye."}]})
    rule = make_rule(RuleRewardConfig(name="ifeval", kind="python",
                                      checker="flywheel.analysis.ifworld:fraction_followed"))
    assert rule("Say hi.", "Hi there. Bye.", reference)[0] == 1.0
    assert rule("Say hi.", "Hi, there. Bye.", reference)[0] == 0.5
    assert rule("Say hi.", "Hi, there.", reference)[0] == 0.0
    assert ifw.all_followed("Say hi.", "Hi, there. Bye.", reference) == 0.0
    with pytest.raises(RewardError, match="reference"):
        rule("Say hi.", "Hi.", None)
