"""Values that would crash or hang a stage after minutes of work are refused before any: at config load (bounds,
finite floats, no true/false for numbers, no greedy sampling where several samples are drawn) or by the run's
preflight (template fields, seed lengths, the prompts file). Each message names the field."""

import json
import logging
from pathlib import Path

import pytest
from pydantic import BaseModel

from flywheel.config import REPO, ConfigError, FlywheelConfig, _numeric, load_config
from flywheel.pipeline import preflight
from flywheel.stages.judge import check_judge
from flywheel.stages.seeds import SeedFormatError


def refused(overrides: list[str], *words: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    return msg


def numeric_fields(model: type[BaseModel] = FlywheelConfig, prefix: str = ""):
    """(dotted name, annotation) of every number field of the config, sections and monitors included."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from numeric_fields(ann, f"{prefix}{name}.")
        elif _numeric(ann):
            yield f"{prefix}{name}", ann


FLOATS = [name for name, ann in numeric_fields() if "float" in str(ann) and "[" not in str(ann)]  # lists, maps: below
NUMBERS = [name for name, _ in numeric_fields()]


# --- greedy sampling where several samples are drawn ------------------------------------------------------------------
def test_greedy_generation_of_several_candidates_is_refused():
    refused(["generate.temperature=0"], "generate.temperature=0", "generate.n=4", "greedy")
    refused(["generate.temperature=0.0", "generate.n=8"], "generate.n=8")


def test_greedy_judge_sampling_is_refused_only_with_several_samples():
    refused(["judge.temperature=0"], "judge.temperature=0", "judge.samples=3")
    assert load_config(None, ["judge.temperature=0", "judge.samples=1"]).judge.temperature == 0
    assert load_config(None, ["judge.temperature=0", "judge.mode=prob"]).judge.mode == "prob"  # prob: no sampling
    assert load_config(None, ["self_instruct.temperature=0"]).self_instruct.temperature == 0  # one reply per attempt


# --- bounds that fit real models --------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, field, bound", [
    ("judge.samples=100000", "judge.samples", "64"),
    ("generate.n=100000", "generate.n", "512"),
    ("generate.max_new_tokens=100000000", "generate.max_new_tokens", "32768"),
    ("judge.max_new_tokens=100000000", "judge.max_new_tokens", "32768"),
    ("self_instruct.max_new_tokens=100000000", "self_instruct.max_new_tokens", "32768"),
    ("ppo.max_new_tokens=100000000", "ppo.max_new_tokens", "32768"),
    ("grpo.max_completion_length=100000000", "grpo.max_completion_length", "32768"),
    ("sft.max_length=100000000", "sft.max_length", "131072"),
    ("dpo.max_length=100000000", "dpo.max_length", "131072"),
    ("run.iterations=1000000000", "run.iterations", "1000"),
    ("self_instruct.num_prompts=1000000000", "self_instruct.num_prompts", "1000000"),
    ("sft.epochs=1e9", "sft.epochs", "1000"),
])
def test_sizes_past_real_models_are_refused(override, field, bound):
    refused([override], f"  {field}: ", bound)


def test_the_bounds_themselves_are_accepted():
    cfg = load_config(None, ["judge.samples=64", "generate.n=512", "generate.max_new_tokens=32768",
                             "run.iterations=1000", "sft.max_length=131072"])
    assert (cfg.judge.samples, cfg.generate.n, cfg.run.iterations) == (64, 512, 1000)


# --- finite floats, no true/false for numbers ----------------------------------------------------------------------------
def test_every_float_field_is_found():
    assert {"sft.learning_rate", "dpo.learning_rate", "ppo.learning_rate", "ppo.value_learning_rate",
            "grpo.learning_rate", "rloo.learning_rate", "rs_sft.learning_rate", "sft.baseline_learning_rate",
            "model.tiny.pretrain_lr", "dpo.beta", "generate.temperature", "monitors.max_score_rise"} <= set(FLOATS)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan"])
@pytest.mark.parametrize("field", FLOATS)
def test_every_float_must_be_finite(field, value):
    msg = refused([f"{field}={value}"], field.rsplit(".", 1)[-1])
    assert "finite" in msg or value == "-.inf" and "greater than" in msg, msg  # -inf may fail a lower bound first


@pytest.mark.parametrize("override, field", [
    ("reward.weights={judge: .inf}", "reward.weights.judge"),
    ("pairs.rho=[0.1, .nan]", "pairs.rho"),
])
def test_floats_inside_lists_and_maps_must_be_finite(override, field):
    refused([override], field, "finite")


@pytest.mark.parametrize("field", NUMBERS)
def test_true_is_not_a_number(field):
    refused([f"{field}=true"], field.rsplit(".", 1)[-1], "true/false")


def test_yaml_ints_still_fill_float_fields():
    cfg = load_config(None, ["sft.learning_rate=1", "generate.temperature=1", "dpo.beta=1"])
    assert (cfg.sft.learning_rate, cfg.generate.temperature, cfg.dpo.beta) == (1.0, 1.0, 1.0)
    assert load_config(None, ["reward.weights={judge: 1}"]).reward.weights == {"judge": 1.0}


def test_every_shipped_config_still_loads():
    for path in [*Path("configs").glob("*.yaml"), Path("tests/small.yaml")]:
        load_config(path)
    from flywheel.analysis.experiment import load_experiment

    for path in Path("configs/experiments").glob("*.yaml"):
        exp = load_experiment(path)
        assert exp.config  # the shared part validates as a FlywheelConfig with each variant below


# --- templates --------------------------------------------------------------------------------------------------------
JUDGE_OK = "Rate 0-5.\nQuestion: {instruction}\nReply: {response}\nEnd with Score: N"


@pytest.fixture
def in_tmp(tmp_path):
    """A config whose registry is in tmp_path, and a writer for files there."""
    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.mark.parametrize("text, words", [
    ("[Question]\n{question}\n[The Start of Assistant's Answer]\n{answer}\nRating: [[N]]", ["{question}", "line 2"]),
    ('Reply in JSON: {"score": N}\n{instruction}\n{response}', ['{"score": N}', "line 1"]),
    ("Question: {instruction}\nThe reply is not shown.", ["no {response} field"]),
    ("Question: {instruction}\nReply: {response}\nScore: } N", ["stray brace", "line 3"]),
    ("Question: {instruction}\nReply: {response!r}", ["{response!r}"]),
    ("Question: {0}\nReply: {response}", ["{0}"]),
])
def test_a_judge_template_the_stage_cannot_fill_is_refused_at_preflight(in_tmp, tmp_path, text, words):
    path = in_tmp("judge.txt", text)
    cfg = load_config(None, [f"registry.root={tmp_path}", f"judge.template={path}"])
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert msg.startswith(f"judge.template: {path}") and all(w in msg for w in words), msg
    assert "{{" in msg or "needs {instruction}, {response}" in msg  # how to escape, or what it needs
    with pytest.raises(ConfigError):
        check_judge(cfg)  # `flywheel eval judge` checks it too


def test_escaped_braces_and_the_shipped_templates_pass(in_tmp, tmp_path):
    path = in_tmp("judge.txt", 'Reply in JSON: {{"score": N}}\n' + JUDGE_OK)
    preflight(load_config(None, [f"registry.root={tmp_path}", f"judge.template={path}"]))
    for template in Path("prompts").glob("judge*.txt"):
        preflight(load_config(None, [f"registry.root={tmp_path}", f"judge.template={template}"]))
    preflight(load_config(None, [f"registry.root={tmp_path}", "self_instruct.mode=chat"]))


@pytest.mark.parametrize("mode, setting", [("completion", "self_instruct.template"),
                                           ("chat", "self_instruct.chat_template")])
@pytest.mark.parametrize("text, words", [
    ("Tasks people asked:\n{tasks}\nTask:", ["{tasks}", "line 2", "it fills {examples}"]),
    ("Write one new task.\nTask:", ["no {examples} field"]),
    ("{examples}\nTask {", ["stray brace", "line 2"]),
])
def test_a_self_instruct_template_is_checked_for_its_mode(in_tmp, tmp_path, mode, setting, text, words):
    path = in_tmp("si.txt", text)
    cfg = load_config(None, [f"registry.root={tmp_path}", f"self_instruct.mode={mode}", f"{setting}={path}"])
    with pytest.raises(ConfigError) as e:
        preflight(cfg)
    assert str(e.value).startswith(f"{setting}: {path}") and all(w in str(e.value) for w in words), str(e.value)


# --- seeds ------------------------------------------------------------------------------------------------------------
def test_a_huge_seed_is_refused_at_preflight_naming_its_line(in_tmp, tmp_path):
    lines = [json.dumps({"instruction": f"Task {i}?", "response": "An answer."}) for i in range(3)]
    lines[1] = json.dumps({"instruction": "Q" * 1_000_000, "response": "An answer."})
    path = in_tmp("seeds.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(SeedFormatError, match=rf"{path}:2: a seed prompt of 1,000,000 characters, over "
                                              r"seeds.max_chars \(20,000\)"):
        preflight(load_config(None, [f"registry.root={tmp_path}", f"seeds.path={path}"]))
    lines[1] = json.dumps({"instruction": "A task?", "response": "R" * 30_000})
    in_tmp("seeds.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(SeedFormatError, match=f"{path}:2: a seed reply of 30,000"):
        preflight(load_config(None, [f"registry.root={tmp_path}", f"seeds.path={path}"]))
    preflight(load_config(None, [f"registry.root={tmp_path}", f"seeds.path={path}", "seeds.max_chars=40000"]))


def test_a_huge_ranked_reply_is_refused_too(in_tmp, tmp_path):
    tree = {"message_tree_id": "t", "prompt": {"text": "Why?", "role": "prompter", "replies": [
        {"text": "Because.", "role": "assistant", "rank": 0}, {"text": "x" * 25_000, "role": "assistant", "rank": 1}]}}
    path = in_tmp("trees.jsonl", json.dumps(tree) + "\n")
    with pytest.raises(SeedFormatError, match=f"{path}:1: a seed reply of 25,000"):
        preflight(load_config(None, [f"registry.root={tmp_path}", f"seeds.path={path}"]))


# --- the prompts file -------------------------------------------------------------------------------------------------
def pool(in_tmp, prompts: list[str]) -> Path:
    return in_tmp("pool.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))


def test_a_prompts_file_too_small_for_the_run_is_refused(in_tmp, tmp_path):
    path = pool(in_tmp, [f"Sort the digits {i}." for i in range(10)] * 3)  # 30 lines, 10 distinct
    cfg = load_config(None, [f"registry.root={tmp_path}", f"self_instruct.prompts_file={path}",
                             "self_instruct.num_prompts=8", "run.iterations=2"])
    refused_msg = pytest.raises(ConfigError, preflight, cfg).value
    assert "has 10 distinct prompts" in str(refused_msg) and "needs 16" in str(refused_msg)
    assert "self_instruct.num_prompts=8 x 2 iteration(s)" in str(refused_msg)
    # an iteration that trains on the seeds alone (the plain-SFT baseline) draws no prompts
    preflight(cfg.model_copy(update={"train": cfg.train.model_copy(update={"trainer": ["dpo", "sft"]})}))


def test_prompts_the_seeds_hold_do_not_count(in_tmp, tmp_path):
    seeds = [json.loads(line)["instruction"] for line in Path("seeds/demo.jsonl").read_text().splitlines()[:4]]
    path = pool(in_tmp, seeds + ["A new task?"] * 2)
    cfg = load_config(None, [f"registry.root={tmp_path}", f"self_instruct.prompts_file={path}",
                             "self_instruct.num_prompts=2", "run.iterations=1"])
    with pytest.raises(ConfigError, match="has 1 distinct prompts the seeds do not hold, and the run needs 2"):
        preflight(cfg)


def test_repeated_prompts_count_once_with_a_warning(in_tmp, tmp_path, caplog):
    path = pool(in_tmp, [f"Sort the digits {i}." for i in range(10)] * 3)
    cfg = load_config(None, [f"registry.root={tmp_path}", f"self_instruct.prompts_file={path}",
                             "self_instruct.num_prompts=5", "run.iterations=2"])
    with caplog.at_level(logging.WARNING, logger="flywheel"):
        preflight(cfg)
    assert "20 repeated prompt(s) counted once (10 distinct of 30), e.g. 'Sort the digits 0.'" in caplog.text


def test_one_prompt_with_two_references_is_refused(in_tmp, tmp_path):
    path = in_tmp("pool.jsonl", '{"prompt": "Sort 21.", "reference": "12"}\n{"prompt": "Sort 21.", "reference": "21"}\n')
    cfg = load_config(None, [f"registry.root={tmp_path}", f"self_instruct.prompts_file={path}",
                             "self_instruct.num_prompts=1", "run.iterations=1"])
    with pytest.raises(ValueError, match="'Sort 21.' is given two references"):
        preflight(cfg)


# --- flywheel's own files from any folder ---------------------------------------------------------------------------------
def test_the_default_config_runs_its_preflight_from_another_folder(tmp_path, monkeypatch):
    here = load_config(None)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [f"registry.root={tmp_path / 'reg'}"])
    assert cfg.judge.template == REPO / "prompts/judge.txt" and cfg.seeds.path == REPO / "seeds/demo.jsonl"
    preflight(cfg)  # the templates' fields and the seeds, all found from here
    demo = load_config(REPO / "configs/demo.yaml")  # a relative name flywheel ships: its own file
    assert demo.judge.template == REPO / "prompts/judge_compact.txt"
    check_judge(demo)
    # written relative, so the config (and its run id) hashes the same from any folder, and reloads to the same files
    assert cfg.model_dump(mode="json")["judge"]["template"] == "prompts/judge.txt"
    assert load_config(None).config_hash() == here.config_hash()
    again = FlywheelConfig.model_validate(cfg.model_dump(mode="json"))
    assert again.judge.template == cfg.judge.template


def test_a_relative_path_you_give_keeps_its_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts/judge.txt").write_text(JUDGE_OK)
    cfg = load_config(None, ["judge.template=prompts/judge.txt"])
    assert cfg.judge.template.resolve() == tmp_path / "prompts/judge.txt"
    assert cfg.model_dump(mode="json")["judge"]["template"] == "prompts/judge.txt"
    with pytest.raises(ConfigError, match="judge.template: template file not found: mine.txt"):
        check_judge(load_config(None, ["judge.template=mine.txt"]))  # not shipped: missing, as before

