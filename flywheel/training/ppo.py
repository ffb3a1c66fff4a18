"""PPO with the coherent reward (SRPPO), written on plain torch + transformers.

    metrics = ppo_train(policy, ref_model, tokenizer, prompts, reward_fn, cfg.ppo, device="cpu", seed=0)
    TRAINER.stage(ctx, state)   # the stage: state.prompts, state.model (M_t), state.m1 (SFT), state.pt

One PPO step: sample one response per prompt from the policy (a batch of `rollout_batch_size` prompts, cycling through
a shuffled list), score each with `reward_fn(prompts, responses) -> list[float]`, then `ppo_epochs` passes of
minibatch updates. Per response token t the reward is the KL penalty -kl_coef * (log pi(t) - log ref(t)); the
sequence-level score (whitened over the batch when `whiten_rewards`) is added at the response's last token (its eos,
or the last token when max_new_tokens cut it): SRPPO credits the coherent reward at the end, since crediting it per
token invites length degeneration (per-step credit is opt-in: `steps.credit`, below). GAE (gamma, lam) gives
advantages (whitened) and returns; the policy minimises the clipped surrogate and the critic the clipped value loss;
gradients are clipped to max_grad_norm. Log-probabilities, for the ratio and for the KL, are those of the sampling
distribution (logits / temperature); top-p is not modelled.

The critic is a separate copy of the policy's transformer body with a linear value head on its last hidden state, not
a head on the policy itself: the value loss never moves the policy's weights (no value-loss coefficient to tune
against the surrogate), and the critic learns at its own rate (`value_learning_rate`). The price is one more body in
memory. Dropout is off throughout (eval mode), so the ratio is exactly 1 on the first minibatch. Trainable weights are
kept in float32 (bfloat16 cannot hold updates of lr ~1e-6) with bfloat16 autocast on CUDA; the policy is cast back
to its original dtype at the end.

Step credit (opt-in, `steps.credit` > 0; off by default): a process reward beside the sequence score. `step_credit`
(flywheel.stages.steps.online_step_rewards) scores the steps of each response text, one (end_char, value) per step;
`weight * value` is added to the reward of the token holding the step's last character
(`flywheel.stages.steps.steps_at_tokens`: the response's token ids decoded prefix by prefix, the `.strip()` of the
text accounted for), so GAE credits each step where it ends. The step metrics then hold `step_reward` (mean step
value) and `steps_per_response`.
"""

from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer

from .. import timing
from ..backends.models import save_atomically
from ..config import FlywheelConfig, PPOConfig
from ..registry import Registry
from ..registry.integrity import model_path
from ..registry.reads import kept_prompts
from ..signals import chat_prompt, check_same_tokenizer, coherent_rewards, pad, pad_id_of
from ..stage import IterationState, StageContext, StageResult
from ..stages.steps import online_step_rewards, steps_at_tokens
from .common import coherent_models, train_stage
from .job import NoTrainingDataError, Trainer, TrainJob

log = logging.getLogger("flywheel")


class ValueModel(nn.Module):
    """The critic: a copy of the policy's transformer body, a zero-initialised scalar head on its last hidden state."""

    def __init__(self, policy):
        super().__init__()
        self.body = copy.deepcopy(policy.base_model)
        self.head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, attention_mask):
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden.float()).squeeze(-1)


def _logprobs(model, ids, mask, temperature: float) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) under logits / temperature: shape [batch, length - 1]."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / temperature
    return logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def _whiten(x, mask=None):
    if mask is None:  # one score cannot be whitened: it is used as it is
        return (x - x.mean()) / (x.std() + 1e-8) if x.numel() > 1 else x
    mean = _masked_mean(x, mask)
    var = _masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def _gae(rewards, values, mask, gamma: float, lam: float):
    """Advantages and returns over the response tokens (mask 1); values outside the response count as 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


@torch.no_grad()
def _rollout(policy, tokenizer, prompts: list[str], c: PPOConfig, device: str, autocast):
    """Sample one response per prompt; return the prompt+response batch, right-padded, and the responses' mask."""
    eos, pad_id = tokenizer.eos_token_id, pad_id_of(tokenizer)
    prompt_ids = [tokenizer(chat_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask = pad(prompt_ids, pad_id, left=True)
    with timing.compute(), autocast():
        out = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                              temperature=c.temperature, top_p=c.top_p, top_k=None, max_new_tokens=c.max_new_tokens,
                              pad_token_id=pad_id, eos_token_id=eos)
    responses = []
    for row in out[:, ids.shape[1]:].tolist():  # generate pads only after eos, so a row without eos is all real
        responses.append(row[: row.index(eos) + 1] if eos in row else row)
    seqs, seq_mask = pad([p + r for p, r in zip(prompt_ids, responses)], pad_id)
    response_mask = torch.zeros(seqs.shape[0], seqs.shape[1] - 1)  # aligned with the shifted targets ids[:, 1:]
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        response_mask[i, len(p) - 1 : len(p) - 1 + len(r)] = 1
    responses = [[t for t in r if t != eos] for r in responses]  # eos only ever ends a response
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in responses]
    return seqs.to(device), seq_mask.to(device), response_mask.to(device), texts, responses


def add_step_rewards(rewards, mask, token_steps: list[list[tuple[int, float]]], weight: float) -> None:
    """In place: `weight * value` on each step's token, (token index within the response, value) per response row;
    `rewards` and `mask` [batch, length - 1], aligned with the shifted targets (mask 1 on the response's tokens)."""
    first = mask.argmax(1).tolist()  # each response's first column
    for row, steps in enumerate(token_steps):
        for index, value in steps:
            rewards[row, first[row] + index] += weight * value


def ppo_train(policy, ref_model, tokenizer, prompts: list[str], reward_fn, cfg: PPOConfig, *, device: str, seed: int,
              progress: bool = True, references: list[str | None] | None = None, step_credit=None,
              step_credit_weight: float = 0.0) -> dict:
    """Train `policy` in place; returns the last step's metrics and `history`, one dict per step (reward: mean raw
    score of that step's fresh samples; kl: mean over responses of sum_t log pi - log ref; pg_loss, vf_loss, ...).
    `step_credit(prompts, responses, references)` (optional; `references` aligned with `prompts`) gives step rewards,
    credited with `step_credit_weight` at each step's last token (the module docstring)."""
    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    references = references if references is not None else [None] * len(prompts)
    if len(references) != len(prompts):
        raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
    credit = (step_credit, step_credit_weight) if step_credit is not None else None
    c = cfg
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    dtype = next(policy.parameters()).dtype
    policy.float().eval()
    ref_model.eval().requires_grad_(False)
    critic = ValueModel(policy).to(device).eval()
    optimizer = torch.optim.AdamW([
        {"params": policy.parameters(), "lr": c.learning_rate},
        {"params": critic.parameters(), "lr": c.value_learning_rate or c.learning_rate},
    ], weight_decay=0.0)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device == "cuda" else nullcontext
    queue: list[int] = []
    history: list[dict] = []
    bar = _progress_bar(progress, c.steps)
    try:
        for step in range(c.steps):
            while len(queue) < c.rollout_batch_size:
                queue += torch.randperm(len(prompts), generator=order).tolist()
            picked, queue = queue[: c.rollout_batch_size], queue[c.rollout_batch_size :]
            history.append(_step(policy, ref_model, critic, optimizer, tokenizer, [prompts[i] for i in picked],
                                 reward_fn, c, device, autocast, order, [references[i] for i in picked], credit))
            log.info("ppo step %d/%d: %s", step + 1, c.steps, {k: round(v, 4) for k, v in history[-1].items()})
            if bar:
                h = history[-1]
                bar[0].update(bar[1], advance=1, description=f"ppo  reward {h['reward']:+.3f}  kl {h['kl']:.3f}")
    finally:
        if bar:
            bar[0].stop()
        policy.to(dtype)
    return {**history[-1], "steps": len(history), "history": history}


def _step(policy, ref_model, critic, optimizer, tokenizer, prompts, reward_fn, c: PPOConfig, device, autocast,
          order, references, credit) -> dict:
    policy.eval()
    ids, attn, mask, texts, responses = _rollout(policy, tokenizer, prompts, c, device, autocast)
    scores = torch.tensor([float(s) for s in reward_fn(prompts, texts)], device=device)
    with torch.no_grad(), timing.compute(), autocast():
        old_logp = _logprobs(policy, ids, attn, c.temperature) * mask
        ref_logp = _logprobs(ref_model, ids, attn, c.temperature) * mask
        old_values = critic(ids, attn)[:, :-1] * mask
    kl = old_logp - ref_logp
    rewards = -c.kl_coef * kl
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # index of each response's last token
    rows = torch.arange(len(prompts), device=device)
    rewards[rows, last] += _whiten(scores) if c.whiten_rewards else scores
    step_stats = {}
    if credit:
        step_credit, weight = credit
        token_steps = [steps_at_tokens(tokenizer, r, s, stripped=True)
                       for r, s in zip(responses, step_credit(prompts, texts, references))]
        add_step_rewards(rewards, mask, token_steps, weight)
        values = [v for steps in token_steps for _, v in steps]
        step_stats = {"step_reward": sum(values) / len(values) if values else 0.0,
                      "steps_per_response": len(values) / len(token_steps)}
    advantages, returns = _gae(rewards, old_values, mask, c.gamma, c.lam)
    advantages = _whiten(advantages, mask)

    stats: dict[str, list[float]] = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": []}
    for _ in range(c.ppo_epochs):
        for mb in torch.randperm(len(prompts), generator=order).split(c.minibatch_size):
            mb = mb.to(device)
            m, adv, ret = mask[mb], advantages[mb], returns[mb]
            with timing.compute():
                with autocast():
                    logp = _logprobs(policy, ids[mb], attn[mb], c.temperature)
                    values = critic(ids[mb], attn[mb])[:, :-1]
                ratio = torch.exp((logp - old_logp[mb]) * m)
                clipped_ratio = ratio.clamp(1 - c.clip_range, 1 + c.clip_range)
                pg_loss = _masked_mean(torch.max(-adv * ratio, -adv * clipped_ratio), m)
                clipped = old_values[mb] + (values - old_values[mb]).clamp(-c.clip_range_value, c.clip_range_value)
                vf_loss = 0.5 * _masked_mean(torch.max((values - ret) ** 2, (clipped - ret) ** 2), m)
                optimizer.zero_grad(set_to_none=True)
                (pg_loss + vf_loss).backward()
                nn.utils.clip_grad_norm_(policy.parameters(), c.max_grad_norm)
                nn.utils.clip_grad_norm_(critic.parameters(), c.max_grad_norm)
                optimizer.step()
            with torch.no_grad():
                stats["pg_loss"].append(pg_loss.item())
                stats["vf_loss"].append(vf_loss.item())
                stats["clipfrac"].append(_masked_mean(((ratio - 1).abs() > c.clip_range).float(), m).item())
                stats["approx_kl"].append(_masked_mean(old_logp[mb] - logp, m).item())
    return {"reward": scores.mean().item(), "kl": kl.sum(1).mean().item(), "response_tokens": mask.sum(1).mean().item(),
            **step_stats, **{k: sum(v) / len(v) for k, v in stats.items()}}


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   transient=True)
    bar.start()
    return bar, bar.add_task("ppo", total=total)


def train_ppo(ctx: StageContext, state: IterationState) -> StageResult:
    """M_{t+1} = PPO of M_t on the kept prompts of `state.prompts`, rewarded by the coherent reward of the SFT and PT
    models (`state.m1`, `state.pt`), with the SFT model as the KL reference; with `steps.credit` > 0, step rewards
    too (the module docstring)."""
    cfg, model_id = ctx.cfg, state.model
    inputs = {"model": model_id, "prompts": state.prompts, "sft": state.m1, "pt": state.pt,
              "cfg": cfg.ppo.model_dump(mode="json"), "normalize_by_length": cfg.reward.normalize_by_length,
              "seed": cfg.run.seed}
    if cfg.steps.credit > 0:  # only then: the stage ids of runs without step credit stay what they were
        inputs["steps"] = cfg.steps.model_dump(mode="json")

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        rows = kept_prompts(reg, state.prompts)
        if not rows:
            raise NoTrainingDataError(f"PPO (iteration {ctx.iteration}): the prompt stage {state.prompts} kept no "
                                      "prompts")
        job = TrainJob("ppo", model_path(reg, model_id), str(reg.model_dir(sid)),
                       [{"prompt": r["prompt"], "reference": r["reference"]} for r in rows],
                       sft_path=model_path(reg, state.m1), pt_path=model_path(reg, state.pt))
        return job, {"ref_model_id": state.m1, "stats": {"prompts": len(rows)}}

    return train_stage(ctx, TRAINER, model_id, inputs, make_job)


def fit_ppo(cfg: FlywheelConfig, job: TrainJob, policy, tokenizer, *, device: str, seed: int, save_dir: str) -> dict:
    sft, pt = coherent_models(job, device)
    check_same_tokenizer(AutoTokenizer.from_pretrained(job.sft_path), AutoTokenizer.from_pretrained(job.pt_path))
    check_same_tokenizer(tokenizer, AutoTokenizer.from_pretrained(job.sft_path), "policy", "SFT")
    policy = policy.to(device)

    def reward_fn(batch_prompts, responses):
        scores = coherent_rewards(sft, pt, tokenizer, batch_prompts, responses, batch_size=cfg.reward.batch_size,
                                  normalize=cfg.reward.normalize_by_length, device=device)
        bad = [s for s in scores if s["value"] is None]
        if bad:
            raise ValueError(f"PPO: the coherent reward of {len(bad)} response(s) could not be computed: "
                             f"{bad[0]['error']}; lower ppo.max_new_tokens")
        return [s["value"] for s in scores]

    metrics = ppo_train(policy, sft, tokenizer, [r["prompt"] for r in job.rows], reward_fn, cfg.ppo, device=device,
                        seed=seed, references=[r.get("reference") for r in job.rows],
                        step_credit=online_step_rewards(cfg), step_credit_weight=cfg.steps.credit)
    save_atomically(policy, tokenizer, Path(save_dir))
    return {**metrics, "reward_first": metrics["history"][0]["reward"]}


TRAINER = Trainer("ppo", section="ppo", consumes=("prompts",), stage=train_ppo, fit=fit_ppo)
