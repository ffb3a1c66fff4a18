"""Step credit (`steps.credit`): step rewards credited at each step's last token in PPO, GRPO and RLOO.

The char -> token mapping on the seed-trained tokenizer; PPO's reward tensor by hand and a real PPO run through a
spy on it; the process-supervised advantages (DeepSeekMath) by hand; real GRPO and RLOO steps on a tiny random Llama
with a step rule from the config; TRL's own trainer classes when step credit is off; and the stage inputs, which gain
`steps` only when it is on.
"""

import math
import re

import pytest
import torch
from trl import GRPOTrainer, RLOOTrainer

from flywheel.backends.models import load
from flywheel.config import OnlineRLConfig, PPOConfig, StepsConfig, load_config
from flywheel.registry import Registry
from flywheel.stage import IterationState, StageContext
from flywheel.stages.steps import online_step_rewards, split_steps, steps_at_tokens
from flywheel.training import loops, online, ppo
from flywheel.training.loops import StepCreditGRPOTrainer, StepCreditRLOOTrainer, grpo_train, process_advantages
from flywheel.training.ppo import add_step_rewards, ppo_train
from tests.helpers.registry import register_arithmetic

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # real PPO, GRPO and RLOO steps

STEPS = ["steps.split=line", "steps.rule=tests.test_step_credit:digit_lines", "steps.credit=0.5"]


def digit_lines(prompt, reference, steps):
    """The step rule of these tests: a line scores 1.0 if it holds a digit, else 0.0."""
    return [1.0 if re.search(r"\d", s) else 0.0 for s in steps]


def _credit_fn(tmp_path):
    return online_step_rewards(load_config(None, [f"registry.root={tmp_path}", *STEPS]))


def _recording(credit, calls):
    def record(prompts, completions, references):
        calls.append((list(prompts), list(completions), list(references)))
        return credit(prompts, completions, references)

    return record


# --- char offsets -> tokens -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lead", ["", " \n  "])
def test_each_line_lands_on_the_token_holding_its_last_char(tiny_model_path, lead):
    _, tok = load(tiny_model_path)
    text = "Add 12 and 30.\nThat gives 42, the answer.\n\nDone"
    ids = tok(lead + text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == lead + text  # byte-level BPE: the ids spell the text exactly
    steps = split_steps(text, StepsConfig(split="line", rule="m:f"))
    assert [s.text for s in steps] == ["Add 12 and 30.", "That gives 42, the answer.", "Done"]
    found = steps_at_tokens(tok, ids, [(s.end, float(s.index)) for s in steps], stripped=bool(lead))
    assert [v for _, v in found] == [0.0, 1.0, 2.0] and found[-1][0] == len(ids) - 1
    for (index, _), s in zip(found, steps):
        before, through = tok.decode(ids[:index]), tok.decode(ids[: index + 1])
        assert len(before) < len(lead) + s.end <= len(through)  # token `index` holds the step's last character
        assert through.strip().endswith(s.text)


# --- PPO --------------------------------------------------------------------------------------------------------------
def test_ppo_step_rewards_sit_on_the_step_end_tokens():
    rewards = torch.zeros(2, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1.0]])  # responses start at columns 2 and 1
    add_step_rewards(rewards, mask, [[(0, 1.0), (2, -1.0)], [(4, 3.0), (4, 1.0)]], weight=0.5)
    assert rewards.tolist() == [[0, 0, 0.5, 0, -0.5, 0], [0, 0, 0, 0, 0, 2.0]]


def test_ppo_trains_with_step_credit(tiny_model_path, tmp_path, monkeypatch):
    policy, tok = load(tiny_model_path)
    ref, _ = load(tiny_model_path)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    spied = []

    def spy(rewards, mask, token_steps, weight):
        old = rewards.clone()
        add_step_rewards(rewards, mask, token_steps, weight)
        spied.append((rewards - old, mask.clone(), token_steps, weight))

    monkeypatch.setattr(ppo, "add_step_rewards", spy)
    calls = []
    prompts = [f"What is {i} plus {i}?" for i in range(4)]
    cfg = PPOConfig(steps=2, rollout_batch_size=4, minibatch_size=2, ppo_epochs=1, learning_rate=1e-3,
                    max_new_tokens=12)
    out = ppo_train(policy, ref, tok, prompts, lambda p, r: [0.0] * len(r), cfg, device="cpu", seed=0, progress=False,
                    references=[str(2 * i) for i in range(4)], step_credit=_recording(_credit_fn(tmp_path), calls),
                    step_credit_weight=0.5)

    assert out["steps"] == 2 and len(spied) == 2
    for h in out["history"]:
        assert math.isfinite(h["step_reward"]) and 0 <= h["step_reward"] <= 1 and h["steps_per_response"] > 0
    for batch, refs in [(p, r) for p, _, r in calls]:  # each prompt with its own reference
        assert refs == [str(2 * int(q.split()[2])) for q in batch]
    for (delta, mask, token_steps, weight), (_, texts, _) in zip(spied, calls):
        assert weight == 0.5
        for row, (steps, text) in enumerate(zip(token_steps, texts)):
            expected = torch.zeros(mask.shape[1])
            first = int(mask[row].argmax())
            for index, value in steps:
                expected[first + index] += 0.5 * value
            assert torch.allclose(delta[row], expected)
            values = digit_lines(None, None, [s.text for s in split_steps(text, StepsConfig(split="line", rule="m:f"))])
            assert [v for _, v in steps] == values
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


# --- process-supervised advantages ------------------------------------------------------------------------------------
def test_process_advantages_by_hand():
    # group 1: rewards 1, 0 (completion 0) and 1, 1 (completion 1): mean 0.75, std 0.5 -> 0.5, -1.5 and 0.5, 0.5
    # group 2: one completion without steps, one with two steps of equal reward (std 0): all zero
    # group 3: a single step (no std): its reward minus itself, zero
    steps = [[(1, 1.0), (3, 0.0)], [(0, 1.0), (2, 1.0)], [], [(0, 2.0), (1, 2.0)], [(2, 5.0)], []]
    adv = process_advantages(steps, group=2, length=5)
    assert adv[0].tolist() == pytest.approx([-1.0, -1.0, -1.5, -1.5, 0.0])  # sum of the steps ending at or after t
    assert adv[1].tolist() == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0])
    assert adv[2:].abs().sum() == 0


def test_process_advantages_std_zero_only_subtracts_the_mean():
    adv = process_advantages([[(0, 3.0)], [(1, 3.0), (2, 3.0)]], group=2, length=3)
    assert adv.abs().sum() == 0
    adv = process_advantages([[(0, 1.0)], [(0, 3.0)]], group=2, length=2)  # mean 2, std sqrt(2)
    assert adv.flatten().tolist() == pytest.approx([-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2), 0.0])


# --- GRPO and RLOO ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fit", [loops.grpo_train, loops.rloo_train], ids=["grpo", "rloo"])
def test_online_rl_trains_with_step_credit(fit, tiny_model_path, tmp_path, monkeypatch):
    classes = []
    quiet = loops._quiet
    monkeypatch.setattr(loops, "_quiet", lambda trainer: classes.append(type(trainer)) or quiet(trainer))
    prompts = [{"prompt": f"What is {i} plus {i}?", "reference": str(2 * i)} for i in range(4)]

    def length_penalty(prompts, completions, **kwargs):
        return [-len(c[0]["content"]) / 100 for c in completions]

    model, tok = load(tiny_model_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    section = OnlineRLConfig(learning_rate=1e-3, num_generations=2, batch_size=4, max_steps=2, beta=0.0,
                             max_completion_length=10)
    metrics = fit(model, tok, prompts, [length_penalty], section, device="cpu", seed=0,
                  step_credit=_recording(_credit_fn(tmp_path), calls), step_credit_weight=0.5)

    assert classes == [StepCreditGRPOTrainer if fit is grpo_train else StepCreditRLOOTrainer]
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"])
    assert 0 <= metrics["step_reward"] <= 1 and metrics["steps_per_response"] > 0
    assert len(calls) == 2 and all(len(c[1]) == 4 for c in calls)
    assert all(refs == [str(2 * int(q.split()[2])) for q in batch] for batch, _, refs in calls)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    print(f"\n{fit.__name__} with step credit: {metrics['seconds_per_step']:.3f} s/step")


@pytest.mark.parametrize("fit", [loops.grpo_train, loops.rloo_train], ids=["grpo", "rloo"])
def test_step_credit_moves_the_update_and_weight_zero_is_trl(fit, tiny_model_path, monkeypatch):
    """Same seed, same samples: weight 0 trains exactly as TRL's own trainer; weight 1 trains differently (the step
    advantages reach the gradient: in every group one completion's step scores 1, the other's 0)."""
    prompts = [{"prompt": f"What is {i} plus {i}?", "reference": None} for i in range(2)]
    section = OnlineRLConfig(learning_rate=1e-2, num_generations=2, batch_size=4, max_steps=1, beta=0.0,
                             max_completion_length=6)
    cls = StepCreditGRPOTrainer if fit is grpo_train else StepCreditRLOOTrainer
    shapes, score = [], cls._generate_and_score_completions

    def spy(self, inputs):
        out = score(self, inputs)
        shapes.append({k: tuple(out[k].shape) for k in ("completion_ids", "advantages", "step_advantages") if k in out})
        return out

    monkeypatch.setattr(cls, "_generate_and_score_completions", spy)

    def length_penalty(prompts, completions, **kwargs):
        return [-len(c[0]["content"]) / 100 for c in completions]

    def alternate(prompts, completions, references):  # one step over the whole text, scored 1, 0, 1, 0, ...
        return [[(len(c), float(i % 2 == 0))] if c else [] for i, c in enumerate(completions)]

    trained = {}
    runs = {"trl": {}, "w0": {"step_credit": alternate, "step_credit_weight": 0.0},
            "w1": {"step_credit": alternate, "step_credit_weight": 1.0}}
    for name, credit in runs.items():
        model, tok = load(tiny_model_path)
        fit(model, tok, prompts, [length_penalty], section, device="cpu", seed=0, **credit)
        trained[name] = model.state_dict()
    assert all(torch.allclose(v, trained["w0"][k], atol=1e-7) for k, v in trained["trl"].items())
    assert any(not torch.allclose(v, trained["w1"][k], atol=1e-6) for k, v in trained["trl"].items())
    assert len(shapes) == 2  # w0 and w1
    for shape in shapes:  # GRPO: (B, T) advantages; RLOO: TRL's (B,) advantages and (B, T) step advantages beside
        b, t = shape["completion_ids"]
        assert shape == ({"completion_ids": (b, t), "advantages": (b, t)} if fit is grpo_train else
                         {"completion_ids": (b, t), "advantages": (b,), "step_advantages": (b, t)})


# --- off: TRL's own trainers; the stage inputs ------------------------------------------------------------------------
def test_without_step_credit_the_trainers_are_trl_own(tiny_model_path, monkeypatch):
    """Only the trainer is built (no training): with no credit function, exactly TRL's classes."""
    built = []
    monkeypatch.setattr(loops, "_finish", lambda trainer, *args: built.append(type(trainer)) or {})
    model, tok = load(tiny_model_path)
    section = OnlineRLConfig(num_generations=2, batch_size=2, max_steps=1, max_completion_length=4, beta=0.0)
    rows = [{"prompt": "hi", "reference": None}]
    for fit in (loops.grpo_train, loops.rloo_train):
        fit(model, tok, rows, [lambda prompts, completions, **kw: [0.0] * len(completions)], section, device="cpu",
            seed=0)
    assert built == [GRPOTrainer, RLOOTrainer]


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_stage_inputs_gain_steps_only_with_credit(stage, tmp_path, tiny_model_path, monkeypatch):
    """The stage's inputs (its id) are unchanged without step credit; with it they hold the steps section, and the
    training rows carry each prompt's reference (PPO's too)."""
    seen = {}

    def capture(ctx, trainer, model_id, inputs, make_job):
        seen["inputs"], seen["make_job"] = inputs, make_job

    module, train = (ppo, ppo.train_ppo) if stage == "ppo" else (online, online.train_grpo)
    monkeypatch.setattr(module, "train_stage", capture)
    state = IterationState(model="m1", prompts="si-t", m1="m1", pt="m1")
    for credit in (False, True):
        cfg = load_config(None, [f"registry.root={tmp_path}", "reward.rules=[{name: exact_sum, kind: exact}]",
                                 "reward.weights={judge: 1.0, exact_sum: 1.0}", *(STEPS if credit else [])])
        train(StageContext(cfg, "r", 1), state)
        assert ("steps" in seen["inputs"]) is credit
    assert seen["inputs"]["steps"]["credit"] == 0.5 and seen["inputs"]["steps"]["rule"] == STEPS[1].split("=")[1]
    register_arithmetic(tmp_path, {"m1": tiny_model_path}, {"p0": {"c0": [1]}, "p1": {"c1": [2]}}, "judge-t")
    with Registry(tmp_path) as reg:
        job, _ = seen["make_job"](reg, "sid")
    assert sorted((r["prompt"], r["reference"]) for r in job.rows) == [("What is 0 plus 0?", "0"),
                                                                       ("What is 1 plus 1?", "2")]
