"""The trainers on a tiny random Llama, with real training steps and a real DuckDB registry.

DPO with LoRA (adapters merged into a plain saved model), DPO against M1 as reference, GRPO and RLOO with a rule reward,
rejection-sampling SFT on the best of N candidates, and training in an `accelerate launch --cpu` child process.
Each test prints its seconds per trainer step on the tiny model.
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from flywheel.backends.models import load, save_atomically
from flywheel.config import OnlineRLConfig, load_config
from flywheel.registry import Registry
from flywheel.stage import IterationState, StageContext
from flywheel.stages.pairs import build_pairs
from flywheel.training.dpo import train_dpo
from flywheel.training.loops import grpo_train, rloo_train
from flywheel.training.online import train_grpo, train_rloo
from flywheel.training.sft import best_of_n, train_rs_sft
from tests.helpers.models import save_random_tiny_model, tiny_model
from tests.helpers.registry import register_arithmetic

JUDGE_SID = "judge-t"
PROMPTS_SID = "si-t"
# prompt -> candidate -> judge scores; 8 prompts of 3 candidates, none tied
SCORES = {f"p{i}": {f"p{i}a": [5, 4], f"p{i}b": [1], f"p{i}c": [3]} for i in range(8)}
SCORES["p0"] = {"p0a": [2], "p0b": [1], "p0c": [2]}  # best score 2 (a and c tie: c has the larger id)


# One torch thread: on a shared 2-core machine, 2 threads each spin-waiting on the other made steps ~10x slower. The
# accelerate child inherits it (--num_cpu_threads_per_process).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # real training steps


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models with one tokenizer: M1 (random) and M2 (M1 with perturbed weights)."""
    root = tmp_path_factory.mktemp("models")
    m1 = save_random_tiny_model(root / "m1")
    model, tok = load(m1)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_atomically(model, tok, root / "m2")
    return {"m1": m1, "m2": root / "m2"}


def _config(tmp_path, *overrides):
    return load_config(None, [f"registry.root={tmp_path}", "run.device=cpu", "dpo.batch_size=8", "dpo.max_length=96",
                              "rs_sft.batch_size=4", "rs_sft.max_length=96", *overrides])


def _registry(cfg, models) -> None:
    """M1 (and M2) registered; prompts (with references), 3 candidates each and their judge samples."""
    register_arithmetic(cfg.registry.root, models, SCORES, JUDGE_SID, PROMPTS_SID)


def _model_row(cfg, model_id):
    with Registry(cfg.registry.root) as reg:
        row = reg.model(model_id)
    return {**row, "metrics": json.loads(row["metrics"]), "train_config": json.loads(row["train_config"])}


def _weights(path):
    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def test_dpo_lora_trains_adapters_and_saves_a_merged_plain_model(tmp_path, models):
    cfg = _config(tmp_path, "dpo.lora.enabled=true", "dpo.learning_rate=5e-3", "dpo.dropout=0.1")
    _registry(cfg, models)
    pairs = build_pairs(cfg, "r", 1, JUDGE_SID)
    result = train_dpo(StageContext(cfg, "r", 1), IterationState(model="m1", pairs=pairs.stage_run_id, m1="m1"))

    out = tmp_path / "models" / result.stats["model_id"]
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    before, after = _weights(models["m1"]), _weights(out)  # a plain from_pretrained load, no peft
    assert set(before) == set(after)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # LoRA left it alone
    assert json.loads((out / "config.json").read_text())["attention_dropout"] == 0.0  # dropout was for training only

    row = _model_row(cfg, result.stats["model_id"])
    assert (row["kind"], row["name"], row["parent_id"], row["ref_model_id"]) == ("dpo", "M2", "m1", "m1")
    assert row["dataset_version"] == pairs.stats["dataset_versions"]["train"]
    assert row["train_config"]["lora"]["enabled"] and row["train_config"]["dropout"] == 0.1
    assert row["train_config"]["dropout_applied_to"] == ["attention_dropout"]
    assert row["metrics"]["pairs"] == 8 and row["metrics"]["steps"] == 1 and math.isfinite(row["metrics"]["train_loss"])
    print(f"\nDPO+LoRA: {row['metrics']['seconds_per_step']:.3f} s/step (batch 8)")


def test_dpo_reference_m1_trains_against_m1(tmp_path, models):
    """From M2 at iteration 2: against M2 itself the first DPO loss is exactly ln 2 (policy == reference); against
    M1 it is not, so the reference really was M1; and the model row says so."""
    losses = {}
    for reference in ("previous", "m1"):
        cfg = _config(tmp_path / reference, f"dpo.reference={reference}", "dpo.dropout=0", "dpo.learning_rate=1e-3")
        _registry(cfg, models)
        pairs = build_pairs(cfg, "r", 2, JUDGE_SID)
        result = train_dpo(StageContext(cfg, "r", 2), IterationState(model="m2", pairs=pairs.stage_run_id, m1="m1"))
        row = _model_row(cfg, result.stats["model_id"])
        assert row["ref_model_id"] == {"previous": "m2", "m1": "m1"}[reference]
        assert row["name"] == "M3" and row["train_config"]["reference"] == reference
        losses[reference] = row["metrics"]["first_loss"]
        print(f"\nDPO (reference {reference}): {row['metrics']['seconds_per_step']:.3f} s/step (batch 8)")
    assert losses["previous"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(losses["m1"] - math.log(2)) > 1e-3


def test_dpo_reference_m1_needs_m1_id(tmp_path, models):
    cfg = _config(tmp_path, "dpo.reference=m1")
    with pytest.raises(ValueError, match="no M1"):
        train_dpo(StageContext(cfg, "r", 2), IterationState(model="m2", pairs="pairs-x"))


@pytest.mark.parametrize("fit", [grpo_train, rloo_train], ids=["grpo", "rloo"])
def test_online_rl_runs_real_steps_with_a_rule_reward(fit, models):
    prompts = [{"prompt": f"What is {i} plus {i}?", "reference": str(2 * i)} for i in range(4)]
    seen = []

    def contains_reference(prompts, completions, **kwargs):
        """1 if the answer holds the reference, else a small length penalty (so a group's rewards differ)."""
        seen.extend(zip([p[-1]["content"] for p in prompts], kwargs["reference"]))
        texts = [c[0]["content"] for c in completions]
        return [1.0 if r in t else -len(t) / 100 for t, r in zip(texts, kwargs["reference"])]

    model, tok = load(models["m1"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    section = OnlineRLConfig(learning_rate=1e-3, num_generations=2, batch_size=4, max_steps=2, beta=0.04,
                             max_completion_length=12)
    metrics = fit(model, tok, prompts, [contains_reference], section, device="cpu", seed=0)

    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])
    assert "reward" in metrics and "rewards_contains_reference_mean" in metrics and "kl" in metrics
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(seen) == 2 * 4  # 2 steps x 4 completions, each with its own prompt's reference
    assert all(ref == str(2 * int(q.split()[2])) for q, ref in seen)
    print(f"\n{fit.__name__}: {metrics['seconds_per_step']:.3f} s/step (4 completions of <= 12 tokens)")


def test_rloo_stage_registers_the_model_with_rule_rewards(tmp_path, models):
    cfg = _config(tmp_path, "rloo.max_steps=2", "rloo.batch_size=4", "rloo.num_generations=2",
                  "rloo.max_completion_length=8", "rloo.learning_rate=1e-3",
                  "reward.rules=[{name: exact_sum, kind: exact}]", "reward.weights={judge: 1.0, exact_sum: 2.0}")
    _registry(cfg, models)
    result = train_rloo(StageContext(cfg, "r", 1), IterationState(model="m1", prompts=PROMPTS_SID))
    row = _model_row(cfg, result.stats["model_id"])
    assert (row["kind"], row["ref_model_id"], row["dataset_version"]) == ("rloo", "m1", None)  # prompts written by hand: no frozen version
    assert row["train_config"]["reward_functions"] == {"exact_sum": 2.0} and row["train_config"]["beta"] == 0.04
    assert row["metrics"]["prompts"] == 8 and row["metrics"]["with_reference"] == 8 and row["metrics"]["steps"] == 2
    assert "rewards_exact_sum_mean" in row["metrics"]
    assert train_rloo(StageContext(cfg, "r", 1), IterationState(model="m1", prompts=PROMPTS_SID)).skipped  # same inputs, same key: done, not trained again


def test_grpo_stage_with_the_coherent_reward_loads_sft_and_pt(tmp_path, models):
    """reward.coherent: the stage loads the SFT (here M1) and PT (here M2) models for log p_SFT - log p_PT."""
    cfg = _config(tmp_path, "grpo.max_steps=1", "grpo.batch_size=4", "grpo.num_generations=2",
                  "grpo.max_completion_length=8", "reward.coherent=true", "reward.weights={coherent: 1.0}")
    _registry(cfg, models)
    result = train_grpo(StageContext(cfg, "r", 1), IterationState(model="m1", prompts=PROMPTS_SID, m1="m1", pt="m2"))
    row = _model_row(cfg, result.stats["model_id"])
    assert row["kind"] == "grpo" and row["train_config"]["reward_functions"] == {"coherent": 1.0}
    assert row["metrics"]["steps"] == 1 and math.isfinite(row["metrics"]["rewards_coherent_mean"])
    assert row["metrics"]["rewards_coherent_mean"] != 0  # two different models: a non-zero log-ratio


def test_best_of_n_picks_the_top_candidate_per_prompt():
    rows = [dict(prompt_id="x", candidate_id="a", score=2.0), dict(prompt_id="x", candidate_id="c", score=2.0),
            dict(prompt_id="x", candidate_id="b", score=1.0), dict(prompt_id="y", candidate_id="d", score=0.5)]
    kept, below = best_of_n(rows)
    assert [r["candidate_id"] for r in kept] == ["c", "d"] and below == 0
    kept, below = best_of_n(rows, min_score=1.0)
    assert [r["candidate_id"] for r in kept] == ["c"] and below == 1


def _logp(model, tok, prompt, answer) -> float:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                                  return_dict=True, return_tensors="pt")["input_ids"]
    n_prompt = len(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_dict=True)["input_ids"])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].log_softmax(-1)
    return float(logits[n_prompt - 1:].gather(-1, ids[0, n_prompt:, None]).sum())


def test_rs_sft_trains_on_the_best_of_n(tmp_path, models):
    cfg = _config(tmp_path, "rs_sft.min_score=3", "rs_sft.learning_rate=1e-2", "rs_sft.epochs=2")
    _registry(cfg, models)
    result = train_rs_sft(StageContext(cfg, "r", 1), IterationState(model="m1", judgments=JUDGE_SID))
    s = result.stats
    assert (s["examples"], s["prompts_scored"], s["below_min_score"]) == (7, 8, 1)  # p0's best (2.0) is under 3
    assert s["mean_score"] == 4.5 and s["steps"] == 4
    row = _model_row(cfg, s["model_id"])
    assert row["kind"] == "rs-sft" and row["ref_model_id"] is None and row["dataset_version"].startswith("rs-sft-")

    old, tok = load(models["m1"])
    new, _ = load(row["path"])
    best = [(f"What is {i} plus {i}?", f"The answer to {i} plus {i} is p{i}a.") for i in range(1, 8)]
    gain = sum(_logp(new, tok, q, a) - _logp(old, tok, q, a) for q, a in best)
    assert gain > 0  # the best answers became more likely
    print(f"\nRS-SFT: {s['seconds_per_step']:.3f} s/step (batch 4)")


def test_accelerate_mode_trains_in_a_child_process(tmp_path, models):
    """train.launch.mode=accelerate: the stage runs `accelerate launch --cpu --num_processes 1 -m
    flywheel.training.entry rs-sft ...` as a real subprocess, then registers what the child saved."""
    cfg = _config(tmp_path, "train.launch.mode=accelerate", "rs_sft.learning_rate=1e-2")
    _registry(cfg, models)
    result = train_rs_sft(StageContext(cfg, "r", 1), IterationState(model="m1", judgments=JUDGE_SID))
    s = result.stats
    assert s["examples"] == 8 and s["steps"] == 2 and math.isfinite(s["train_loss"])
    assert not (tmp_path / "jobs" / result.stage_run_id).exists()  # removed after success
    row = _model_row(cfg, s["model_id"])
    after = _weights(row["path"])
    assert row["kind"] == "rs-sft" and row["metrics"]["examples"] == 8
    assert not torch.equal(after["model.norm.weight"], _weights(models["m1"])["model.norm.weight"])
    print(f"\nRS-SFT in an accelerate child: {s['seconds_per_step']:.3f} s/step; stage wall {s['wall_s']:.1f} s")


def test_sft_counts_and_reports_examples_too_long_to_learn_from(caplog):
    """TRL drops an example whose prompt alone fills max_length; sft_train says how many, never silently."""
    from flywheel.backends.models import build_tokenizer
    from flywheel.training.loops import sft_train

    tok = build_tokenizer(["hello world, a small text"] * 20, 300)
    model = tiny_model(tok, 0, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                       max_position=256)
    examples = [{"prompt": "hi", "completion": "hello"}] * 4 + [{"prompt": "x " * 200, "completion": "y"}] * 2
    with caplog.at_level("WARNING", logger="flywheel"):
        metrics = sft_train(model, tok, examples, epochs=1, lr=1e-3, batch_size=2, max_length=64, device="cpu", seed=0)
    assert metrics["examples_dropped_too_long"] == 2 and metrics["steps"] == 2
    assert "2 of 6 examples dropped" in caplog.text
