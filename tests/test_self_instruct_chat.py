"""Self-instruct's two modes on a tiny real model: chat mode sends the chat template as one user turn (chat=True);
completion mode (the tiny model's default) sends the few-shot list to continue, under the key it always had."""

from pathlib import Path

import pytest

from flywheel.backends import TransformersBackend, release_backends
from flywheel.config import content_hash, load_config
from flywheel.registry import Registry
from flywheel.stage import stage_run_id
from flywheel.stages import self_instruct as si
from flywheel.stages.bootstrap import import_seeds

SMALL = ["self_instruct.num_prompts=4", "self_instruct.batch_size=2", "self_instruct.few_shot=3",
         "self_instruct.seed_shots=3", "self_instruct.max_new_tokens=6", "run.device=cpu", "model.base=tiny"]
REASONS = {"empty", "too_short", "too_long", "not_instruction", "not_a_task", "banned_keyword", "duplicate",
           "near_duplicate"}


@pytest.fixture
def setup(tmp_path, tiny_model_path, monkeypatch):
    """(config maker, seeds stage id, model id, recorded generate calls) on a fresh registry."""
    calls, real = [], TransformersBackend.generate

    def spy(self, prompts, params, *, seed, chat):
        outs = real(self, prompts, params, seed=seed, chat=chat)
        calls.append({"prompts": list(prompts), "chat": chat, "outs": [o[0].text for o in outs]})
        return outs

    monkeypatch.setattr(TransformersBackend, "generate", spy)
    root = tmp_path / "reg"

    def make(*overrides):
        return load_config("tests/small.yaml", [f"registry.root={root}", *SMALL, *overrides])

    cfg = make()
    seeds = import_seeds(cfg, "run-a")
    with Registry(root) as reg:
        reg.register_model(model_id="m1", run_id="run-a", name="M1", kind="sft", iteration=0, parent_id=None,
                           path=str(tiny_model_path), stage_run_id="sft-x", config_hash=cfg.config_hash(), metrics={})
    yield make, seeds.stage_run_id, "m1", calls
    release_backends()


def _rows(cfg, sid):
    with Registry(cfg.registry.root) as reg:
        return reg.rows("SELECT * FROM prompts WHERE stage_run_id = ? ORDER BY prompt_id", [sid])


def _texts(cfg, ids):
    with Registry(cfg.registry.root) as reg:
        found = {r["prompt_id"]: r["text"] for r in reg.rows("SELECT prompt_id, text FROM prompts")}
    return [found[i] for i in ids]


def test_resolved_mode():
    for base, mode, want in [("tiny", "auto", "completion"), ("smollm2-135m-instruct", "auto", "chat"),
                             ("/models/x", "auto", "chat"), ("tiny", "chat", "chat"),
                             ("/models/x", "completion", "completion")]:
        cfg = load_config(None, [f"model.base={base}", f"self_instruct.mode={mode}"])
        assert si.resolved_mode(cfg) == want


@pytest.mark.slow  # the self-instruct stage on a tiny model
def test_chat_mode_sends_the_chat_template(setup):
    make, seeds_sid, model, calls = setup
    cfg = make("self_instruct.mode=chat")
    res = si.self_instruct(cfg, "run-a", 1, model, seeds_sid, [])
    template = Path("prompts/self_instruct_chat.txt").read_text(encoding="utf-8")

    assert [c["chat"] for c in calls] == [True, True]  # two batches of two, both as a chat turn
    rows = _rows(cfg, res.stage_run_id)
    assert len(rows) == 4 and res.stats["attempted"] == 4
    prompts = [p for c in calls for p in c["prompts"]]
    outs = [o for c in calls for o in c["outs"]]
    by_id = {r["prompt_id"]: r for r in rows}
    ids = [f"p-{content_hash([res.stage_run_id, i])}" for i in range(4)]  # attempt i's row, in generation order
    seed_ids = {r["prompt_id"] for r in _rows(cfg, seeds_sid)}
    for pid, prompt, out in zip(ids, prompts, outs):
        row = by_id[pid]
        shots = row["few_shot_ids"]
        assert len(shots) == 3 and set(shots) <= seed_ids  # few-shot ids recorded (all seeds: nothing kept yet)
        listed = "\n".join(f"{j}. {t}" for j, t in enumerate(_texts(cfg, shots), 1))
        assert prompt == template.format(examples=listed)  # the chat template, examples as a numbered list
        assert "Task:" not in prompt
        assert row["text"] == si.clean_prompt(out)
        assert row["kept"] == (row["drop_reason"] is None) and row["drop_reason"] in REASONS | {None}

    with Registry(cfg.registry.root) as reg:
        names = {r["name"]: r["template_hash"] for r in reg.rows("SELECT name, template_hash FROM templates")}
    assert names["self_instruct_chat"] == content_hash(template)

    # the key follows the chat template's text (and not the completion template's)
    other = Path(cfg.registry.root).parent / "other_chat.txt"
    other.write_text(template + "\nBe brief.\n", encoding="utf-8")
    changed = si.self_instruct(make("self_instruct.mode=chat", f"self_instruct.chat_template={other}"),
                               "run-a", 1, model, seeds_sid, [])
    assert changed.stage_run_id != res.stage_run_id and not changed.skipped


@pytest.mark.slow  # the self-instruct stage on a tiny model
def test_completion_mode_keeps_its_key_and_prompts(setup):
    make, seeds_sid, model, calls = setup
    cfg = make()  # model.base tiny, mode auto: completion
    res = si.self_instruct(cfg, "run-a", 1, model, seeds_sid, [])
    template = Path("prompts/self_instruct.txt").read_text(encoding="utf-8")

    # the key is the one self-instruct had before chat mode: the new fields are not in it
    c = cfg.self_instruct
    old_inputs = {"model": model, "seeds": seeds_sid, "earlier": [],
                  "cfg": c.model_dump(mode="json", exclude={"mode", "chat_template"}),
                  "template": content_hash(template), "seed": cfg.run.seed}
    assert res.stage_run_id == stage_run_id("self_instruct", old_inputs)

    assert [c["chat"] for c in calls] == [False, False]
    prompts = [p for c in calls for p in c["prompts"]]
    rows = {r["prompt_id"]: r for r in _rows(cfg, res.stage_run_id)}
    for i, prompt in enumerate(prompts):
        row = rows[f"p-{content_hash([res.stage_run_id, i])}"]
        lines = "\n".join(f"Task: {t}" for t in _texts(cfg, row["few_shot_ids"]))
        assert prompt == template.format(examples=lines) and prompt.rstrip().endswith("Task:")

    # 'completion' written out, or another chat template, is the same stage: skipped, nothing generated
    n = len(calls)
    for extra in (["self_instruct.mode=completion"], ["self_instruct.chat_template=elsewhere.txt"]):
        again = si.self_instruct(make(*extra), "run-a", 1, model, seeds_sid, [])
        assert again.skipped and again.stage_run_id == res.stage_run_id
    assert len(calls) == n


def _picker():
    cfg = load_config(None)
    kept = si.KeptPrompts(0.7, ["What is a noun in English grammar?", "Name three planets."])
    echo = si.NearDuplicateIndex(si.ECHO_THRESHOLD)
    for sentence in si.template_sentences(Path("prompts/self_instruct_chat.txt").read_text()):
        echo.add(sentence)
    return kept, cfg.self_instruct, echo


def test_chat_mode_takes_the_first_line_that_passes():
    kept, c, echo = _picker()
    out = "1. What is a noun in English grammar?\n2. Name three planets.\nD: How do volcanoes form?\n4. Why?"
    assert si.pick_prompt(out, kept, c, echo, scan=True) == ("How do volcanoes form?", None)
    # completion mode reads the first line only, as it always did
    assert si.pick_prompt(out, kept, c, None, scan=False) == ("1. What is a noun in English grammar?",
                                                              "not_instruction")
    # nothing passes: the first line with its reason
    assert si.pick_prompt("Name three planets.\nSure:", kept, c, echo, scan=True) == ("Name three planets.",
                                                                                      "duplicate")
    assert si.pick_prompt("", kept, c, echo, scan=True) == ("", "empty")


def test_an_echo_of_the_instruction_is_dropped():
    kept, c, echo = _picker()
    text, reason = si.pick_prompt("Write one new task that is different from all of them, and it should be a "
                                  "question.", kept, c, echo, scan=True)
    assert reason == "echo"
    assert si.pick_prompt("Write a short poem about the sea.", kept, c, echo, scan=True)[1] is None


def test_completion_mode_keeps_statements_as_it_always_did():
    kept, c, _ = _picker()
    assert si.pick_prompt("Rainbows form when sunlight passes through raindrops.\n2. x", kept, c, None,
                          scan=False) == ("Rainbows form when sunlight passes through raindrops.", None)
    assert si.pick_prompt("Rainbows form when sunlight passes through raindrops.", kept, c, None,
                          scan=True)[1] == "not_a_task"
