import random

import pytest

from flywheel.config import SelfInstructConfig
from flywheel.stages.dedup import NearDuplicateIndex
from flywheel.stages.self_instruct import KeptPrompts, clean_prompt, few_shot, not_a_task, rouge_l, words


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
        ("The answer is: four apples.", "not_a_task"),
        ("Rainbows form when sunlight passes through raindrops.", "not_a_task"),
        ("Write a haiku about the rain.", None),
        ("Sure, draw a picture of a cat.", "not_a_task"),       # not_a_task comes before banned_keyword
        ("Draw a picture of a small cat.", "banned_keyword"),  # a request, dropped for what it asks
    ],
)
def test_filter_reasons(text, reason):
    kept = KeptPrompts(0.7, ["List three ways to save water at home."])
    assert kept.reason(text, SelfInstructConfig()) == reason


@pytest.mark.slow  # a brute-force cross-check: 500 prompts, 3 thresholds
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


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Write a haiku about rain.", "Write a haiku about rain."),             # nothing to strip
        ("Task: Write a haiku about rain.", "Write a haiku about rain."),
        ("task:write a haiku about rain.", "write a haiku about rain."),
        ("New task: Name three rivers in Africa.", "Name three rivers in Africa."),
        ("Task 3: Name three rivers in Africa.", "Name three rivers in Africa."),
        ("Question: Why is the sky blue?", "Why is the sky blue?"),
        ("Q: Why is the sky blue? A: Because of Rayleigh scattering.", "Why is the sky blue?"),
        ("Instruction: Explain tides. Answer: The moon pulls the sea.", "Explain tides."),
        ("Prompt: Explain tides. Response: The moon pulls the sea.", "Explain tides."),
        ("User: Explain why leaves change colour in autumn.", "Explain why leaves change colour in autumn."),
        ("1. How many legs does a spider have?\n2. What is a noun?", "How many legs does a spider have?"),
        ("2) List three fruits.", "List three fruits."),
        ("- List three fruits.", "List three fruits."),
        ("* List three fruits.", "List three fruits."),
        ("**Task:** List three fruits.", "List three fruits."),
        ("**Task**: List three fruits.", "List three fruits."),
        ("1. Task: \"List three fruits.\"", "List three fruits."),              # repeatedly, and quotes
        ("“Describe a sunset in two sentences.”", "Describe a sunset in two sentences."),
        ("\n\n  Describe a sunset.\nA sunset is ...", "Describe a sunset."),   # first non-empty line
        ("Rewrite this sentence: \"I is happy.\"", "Rewrite this sentence: \"I is happy.\""),  # inner quotes stay
        ("Add 1.5 and 2.5.", "Add 1.5 and 2.5."),
        ("Task:", ""),
        ("", ""),
    ],
)
def test_clean_prompt(raw, clean):
    assert clean_prompt(raw) == clean


@pytest.mark.parametrize(
    "text, dropped",
    [
        # real tasks: questions, imperatives, requests
        ("Write a haiku about rain.", False),
        ("Explain why the sea is salty.", False),
        ("What is the capital of France?", False),
        ("How do I keep a basil plant alive?", False),
        ("If a book costs 8 dollars, how much do 6 books cost?", False),
        ("A train travels 60 miles per hour for 3 hours, so how far does it go?", False),
        ("Can you suggest a name for a bakery", False),
        ("Please summarise the plot of Hamlet in two sentences.", False),
        ("Fix the spelling mistakes in this sentence: I recieved a gift.", False),
        ("In one sentence, explain what gravity does.", False),
        ("Let's plan a three-day trip to Rome.", False),
        ("I need a short toast for my sister's wedding.", False),
        ("I'm planning a trip to Spain, what should I pack?", True),  # an assistant-like opener, even with a '?'
        # non-tasks
        ("The answer is:", True),
        ("The answer is 42.", True),
        ("Answer: Paris is the capital of France.", True),
        ("Give me three examples of mammals:", True),   # ends with ':' (the input it announces is missing)
        ("Sure! Here is a new task for you.", True),
        ("Here's a question about the weather.", True),
        ("Certainly, explain photosynthesis.", True),
        ("I am a helpful AI assistant named SmolLM.", True),
        ("I’m happy to help with that.", True),
        ("As an AI language model, I cannot do that.", True),
        ("Of course, what would you like to know?", True),
        ("Great question, let me think.", True),
        ("Photosynthesis is the process plants use to make food.", True),
        ("A noun is a word that names a person, place or thing.", True),
        ("The answer to the question \"What is the capital of France?\" is indeed Paris.", True),  # a quoted '?'
        ('Rewrite the question "Why is the sky blue?" for a child.', False),
        # whole words only
        ("Surely you can describe a sunny day?", False),
        ("Greatest inventions in history, list five.", False),
    ],
)
def test_not_a_task(text, dropped):
    assert not_a_task(text) is dropped


def test_seed_tasks_are_tasks():
    """The shipped seeds are what the tiny model imitates: none of them is a non-task, and cleaning leaves them be."""
    from flywheel.stages.seeds import load_seeds

    for s in load_seeds("seeds/demo.jsonl"):
        assert not not_a_task(s.instruction) and clean_prompt(s.instruction) == s.instruction
