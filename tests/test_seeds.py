import pytest

from flywheel.score_parser import parse_score
from flywheel.seeds import SeedFormatError, eft_examples, ift_examples, load_seeds, pretrain_corpus


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
