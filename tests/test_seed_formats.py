"""Seed files in the formats people have (Open Assistant trees, Self-Instruct, Alpaca, chat, flywheel JSONL):
what each gives as IFT seeds and ranked replies, how `auto` decides, and errors that name the bad record."""

import gzip
import json
import shutil

import pytest

from flywheel.stages.seeds import RankedReply, SeedFormatError, load_seed_data, load_seeds

FIX = "tests/fixtures/seeds"


@pytest.mark.parametrize("name, fmt, n_ift", [("oasst.jsonl", "oasst", 5), ("self_instruct.jsonl", "self_instruct", 5),
                                              ("alpaca.json", "alpaca", 4), ("chat.jsonl", "chat", 4),
                                              ("flywheel.jsonl", "flywheel", 3)])
def test_auto_detects_each_format_and_matches_the_explicit_one(name, fmt, n_ift):
    auto = load_seed_data(f"{FIX}/{name}")
    explicit = load_seed_data(f"{FIX}/{name}", fmt)
    assert auto.format == explicit.format == fmt
    assert auto.ift == explicit.ift and auto.ranked == explicit.ranked
    assert len(auto.ift) == n_ift and all(s.instruction and s.response for s in auto.ift)
    assert load_seeds(f"{FIX}/{name}") == auto.ift


def test_oasst_top_ranked_first_turn_reply_is_the_ift_answer_and_ranks_are_kept():
    data = load_seed_data(f"{FIX}/oasst.jsonl")
    ift = {s.id: s for s in data.ift}
    assert list(ift) == ["t-basil", "t-hash", "t-haiku", "t-seasons", "t-interview"]
    assert ift["t-interview"].response.startswith("1. Research the company")  # rank 0, listed second in the tree
    assert ift["t-basil"].instruction == "How do I keep a basil plant alive on a kitchen windowsill?"
    assert data.skipped == {"no_rank_0_reply": 1}  # t-dough: one reply, rank null
    ranked = {p.id: p for p in data.ranked}
    assert list(ranked) == list(ift)  # t-dough has no ranked reply at all
    assert [r.rank for r in ranked["t-haiku"].replies] == [0, 1, 2, 3]
    assert [r.rank for r in ranked["t-hash"].replies] == [0, 1, None]  # a null rank is kept as None
    assert [r.rank for r in ranked["t-interview"].replies] == [1, 0]  # the deleted reply is skipped
    assert ranked["t-hash"].ranked_replies() == list(ranked["t-hash"].replies[:2])
    # first turn only: the follow-up under the basil answer is neither a reply nor an answer
    assert all("Yellow" not in r.text for p in data.ranked for r in p.replies)
    assert ranked["t-seasons"].replies[1] == RankedReply(
        "The seasons happen because Earth is closer to the Sun in summer and farther away in winter.", 1)


def test_self_instruct_alpaca_and_chat_mapping():
    si = {s.id: s for s in load_seeds(f"{FIX}/self_instruct.jsonl")}
    assert si["seed_task_0"].instruction == ("Make a short packing list for the trip described.\n\n"
                                             "Two nights of camping in the mountains in early spring.")
    assert si["seed_task_2"].instruction == "Tell me one surprising fact about octopuses."  # empty input: no lines
    assert si["seed_task_3#1"].response == "0 degrees Celsius"  # one seed per instance
    alpaca = load_seeds(f"{FIX}/alpaca.json")
    assert alpaca[3].instruction == "Translate to French.\n\nGood morning" and alpaca[3].response == "Bonjour"
    assert alpaca[0].instruction == "Suggest a name for a bakery that sells only bread." and alpaca[0].id == "record-0"
    chat = {s.id: s for s in load_seeds(f"{FIX}/chat.jsonl")}
    assert chat["chat-tea"].instruction == "How long should I steep green tea?"  # the system turn is not the prompt
    assert chat["chat-tea"].response.startswith("Two to three minutes")  # the first answer, not the later one
    assert chat["line-1"].response == "Ottawa is the capital of Canada."


@pytest.mark.parametrize("name, message", [
    ("oasst_bad.jsonl", "oasst_bad.jsonl:2 (reply 1): a reply's 'rank' must be a non-negative integer or null, "
                        "got 'second'"),
    ("self_instruct_bad.jsonl", "self_instruct_bad.jsonl:3 (instance 0): 'output' must be a non-empty string"),
    ("alpaca_bad.json", "alpaca_bad.json[2]: 'output' must be a non-empty string"),
    ("chat_bad.jsonl", "chat_bad.jsonl:2: 'messages' has no 'assistant' message after the first 'user' message"),
    ("flywheel_bad.jsonl", "flywheel_bad.jsonl:2: not valid JSON"),
])
def test_malformed_records_are_named_by_file_and_line_or_index(name, message):
    with pytest.raises(SeedFormatError) as e:
        load_seed_data(f"{FIX}/{name}")
    assert message in str(e.value)


@pytest.mark.parametrize("records, fmt, message", [
    ([{"prompt": "not a tree"}], "oasst", "[0]: 'prompt' must be a message object"),
    ([{"prompt": {"text": "q", "role": "assistant", "replies": []}}], "oasst", "has role 'assistant'"),
    ([{"prompt": {"text": "q", "replies": {"a": 1}}}], "oasst", "[0]: 'replies' must be a list, got dict"),
    ([{"prompt": {"text": "q", "replies": [{"text": "a", "rank": -1}]}}], "oasst", "(reply 0): a reply's 'rank'"),
    ([{"instruction": "x", "instances": []}], "self_instruct", "'instances' must hold at least one"),
    ([{"instruction": "x", "input": 3, "output": "y"}], "alpaca", "[0]: 'input' must be a string"),
    ([{"messages": [{"role": "assistant", "content": "hi"}]}], "chat", "has no 'user' message"),
    ([{"messages": [{"role": "user", "content": ["parts"]}, {"role": "assistant", "content": "a"}]}], "chat",
     "(message 0): 'content' must be a non-empty string"),
    ([{"instruction": "x", "output": "y"}], "flywheel", "[0]: 'response' must be a non-empty string"),
])
def test_record_errors_in_a_json_array_name_the_index(tmp_path, records, fmt, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "fine", "output": "fine", "response": "fine", "messages": [
        {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}],
        "instances": [{"input": "", "output": "o"}], "prompt": {"text": "q", "replies": []}}] + records))
    with pytest.raises(SeedFormatError) as e:
        load_seed_data(path, fmt)
    assert f"{path}[1]" in str(e.value) and message.removeprefix("[0]") in str(e.value)


def test_auto_says_when_it_cannot_tell(tmp_path):
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(SeedFormatError, match=r"odd.jsonl:1: cannot tell the seed format .*'answer', 'question'"):
        load_seed_data(odd)
    csv = tmp_path / "seeds.csv"
    shutil.copy(f"{FIX}/flywheel.jsonl", csv)
    with pytest.raises(SeedFormatError, match="cannot tell the seed format from the file name"):
        load_seed_data(csv)
    assert len(load_seed_data(csv, "flywheel").ift) == 3  # an explicit format reads any name
    with pytest.raises(SeedFormatError, match="unknown seed format 'csv'"):
        load_seed_data(csv, "csv")
    with pytest.raises(SeedFormatError, match="seed file not found"):
        load_seed_data(tmp_path / "missing.jsonl")


def test_a_wrong_explicit_format_names_the_missing_field():
    with pytest.raises(SeedFormatError, match=r"alpaca.json\[0\]: 'response' must be a non-empty string"):
        load_seed_data(f"{FIX}/alpaca.json", "flywheel")


def test_gzipped_trees_and_a_file_with_no_usable_seed(tmp_path):
    gz = tmp_path / "trees.jsonl.gz"
    gz.write_bytes(gzip.compress(open(f"{FIX}/oasst.jsonl", "rb").read()))
    assert load_seed_data(gz) == load_seed_data(gz, "oasst") and len(load_seed_data(gz).ift) == 5
    unranked = tmp_path / "unranked.jsonl"
    unranked.write_text(open(f"{FIX}/oasst.jsonl").read().splitlines()[-1] + "\n")  # only t-dough
    with pytest.raises(SeedFormatError, match="no usable seed records .*no_rank_0_reply"):
        load_seed_data(unranked)
