import random

import pytest

from flywheel.config import SelfInstructConfig
from flywheel.dedup import NearDuplicateIndex
from flywheel.self_instruct import KeptPrompts, few_shot, rouge_l, words


def test_rouge_l():
    a = words("list three ways to save water at home")
    assert rouge_l(a, a) == 1.0
    assert rouge_l(a, words("why is the sky blue")) == 0.0
    # LCS "to save water at home" = 5 words, of 6 and of 8: F1 = 2PR / (P + R)
    assert rouge_l(a, words("how to save water at home")) == pytest.approx(2 * (5 / 6) * (5 / 8) / (5 / 6 + 5 / 8))
    assert rouge_l([], a) == 0.0


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("Explain tides.", "too_short"),
        ("List three ways to save water at home.", "duplicate"),
        ("list three ways to save water AT home!", "duplicate"),  # same words after normalising
        ("List three easy ways to save water at home.", "near_duplicate"),
        ("Describe how a rainbow forms after rain.", None),
        (" ".join(["word"] * 200), "too_long"),
        ("Draw a picture of a cat sitting on a mat.", "banned_keyword"),
        ("Summarise the attached file in two lines.", "banned_keyword"),
        ("Describe how a profile forms.", None),  # 'file' inside a word is not the keyword
        ("- Describe how a rainbow forms.", "not_instruction"),
        ("1. 2. 3. 4. 5. 6. 7. 8.", "not_instruction"),
        ("Über alles, write a poem about rivers.", "not_instruction"),
    ],
)
def test_filter_reasons(text, reason):
    kept = KeptPrompts(0.7, ["List three ways to save water at home."])
    assert kept.reason(text, SelfInstructConfig()) == reason


def test_index_agrees_with_a_full_scan():
    """The bounds in NearDuplicateIndex only skip prompts that cannot reach the threshold: same answers as brute force."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(60)] + ["the", "a", "to", "of"] * 10
    docs = [[rng.choice(vocab) for _ in range(rng.randint(1, 14))] for _ in range(400)]
    docs += [d[:-1] + ["extra"] for d in docs[:100]]  # near-duplicates of earlier prompts
    for t in (0.5, 0.7, 0.9):
        index, kept, dropped = NearDuplicateIndex(t), [], 0
        for d in docs:
            brute = max((rouge_l(d, k) for k in kept), default=0.0)
            found, _ = index.best(d)
            assert (found >= t) == (brute >= t)
            if brute >= t:
                assert found == pytest.approx(brute)
                dropped += 1
            else:
                index.add(d)
                kept.append(d)
        assert dropped > 0 and index.lcs_computed < len(docs) * len(kept) / 20  # it skipped almost every pair


def test_few_shot_mixes_seed_and_generated():
    cfg = SelfInstructConfig()  # 8-shot, 6 seed
    seeds = [{"prompt_id": f"s{i}", "text": ""} for i in range(20)]
    generated = [{"prompt_id": f"g{i}", "text": ""} for i in range(5)]
    shots = few_shot(seeds, generated, cfg, ["k"])
    ids = [s["prompt_id"] for s in shots]
    assert len(ids) == 8 and len(set(ids)) == 8 and sum(i.startswith("g") for i in ids) == 2
    assert few_shot(seeds, generated, cfg, ["k"]) == shots  # seeded by its key
    early = few_shot(seeds, generated[:1], cfg, ["k"])      # too few generated yet: seeds fill in
    assert sum(s["prompt_id"].startswith("g") for s in early) == 1 and len(early) == 8
    assert all(s["prompt_id"].startswith("s") for s in few_shot(seeds, [], cfg, ["k"]))
