"""Training steps, each a thin call into TRL: pretraining and SFT (SFTTrainer), DPO (DPOTrainer), GRPO and RLOO.

The functions take a loaded model and plain Python rows, train in place, and return the final metrics; given
`save_dir` they also save the trained model there atomically (see `_save`). They know nothing of the registry: the
trainer modules beside this one (dpo.py, ppo.py, online.py, sft.py) decide what to train on and where it is saved.

    metrics = dpo_train(model, tok, pairs, beta=0.1, lr=1e-6, epochs=1, batch_size=16, max_length=1024,
                        device="cpu", seed=0, min_lr_ratio=0.1, dropout=0.1, lora=cfg.dpo.lora, save_dir=path)
    metrics = grpo_train(model, tok, [{"prompt": ..., "reference": ...}], [reward_fn], cfg.grpo, device="cpu", seed=0)

Prompts and answers go through the model's chat template (one user turn, one assistant turn), for every trainer; so a
GRPO/RLOO reward function receives `completions` as conversations, `[[{"role": "assistant", "content": text}], ...]`,
and every other dataset column (here `reference`) as a keyword argument with one value per completion.
On CPU we turn off what TRL defaults to for GPUs (bf16, gradient checkpointing): both fail or crawl there.

Step credit (GRPO/RLOO with `step_credit`, opt-in via `steps.credit`): TRL gives each completion one sequence-level
advantage. With a step credit function (flywheel.stages.steps.online_step_rewards) the trainers are small subclasses
(`StepCreditGRPOTrainer`, `StepCreditRLOOTrainer`) that also score each completion's steps, place each step's reward on
the token holding its last character, and add process-supervised advantages as in DeepSeekMath: the step rewards
normalised within the prompt's group of completions, token t given the sum of those of the steps ending at or after
it (`process_advantages`); the final per-token advantage is outcome + weight * step. Without one, TRL's own trainers
run unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import torch
import transformers
from accelerate.utils import gather_object
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer, GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer

from .. import timing
from ..stages.steps import steps_at_tokens

# Keep the trainers' own step progress bar; silence per-map bars, load/save bars and a deprecation TRL triggers.
datasets.disable_progress_bars()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("trl").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DPO_METRICS = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
ONLINE_METRICS = ("reward", "reward_std", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio",
                  "step_reward", "steps_per_response")

# Config attributes that hold a dropout probability, across common architectures (Llama has attention_dropout only).
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout")


class _StepBar(ProgressCallback):
    """The trainers' step progress bar, without printing every log dict under it (the metrics are returned)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def _quiet(trainer):
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_StepBar)
    return trainer


def _hardware_args(device: str) -> dict[str, Any]:
    on_gpu = device == "cuda"
    return dict(use_cpu=not on_gpu, bf16=on_gpu, gradient_checkpointing=False)


def _common_args(device: str, seed: int, out_dir: str, tracking: dict | None = None) -> dict[str, Any]:
    """`tracking`: TRL's report_to, run_name and project for `train.report_to` (flywheel.tracking.training)."""
    return dict(
        output_dir=out_dir,
        **{"report_to": "none", **(tracking or {})},
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=False,  # our logger level would turn the bar off and print raw log dicts instead
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        **_hardware_args(device),
    )


def _batches(batch_size: int, micro_batch_size: int | None) -> dict[str, int]:
    """`batch_size` sequences (or pairs) per optimizer step, `micro_batch_size` of them per forward pass (gradient
    accumulation): the same steps with a fraction of the activation memory, which on a real model is most of it."""
    micro = micro_batch_size or batch_size
    if batch_size % micro:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of micro_batch_size ({micro})")
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": batch_size // micro}


def _timed_train(trainer):
    with timing.compute():
        return trainer.train()


def _final_metrics(trainer, train_output, keys: tuple[str, ...] = DPO_METRICS) -> dict[str, float]:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    steps = int(trainer.state.global_step)
    metrics = {"train_loss": float(train_output.training_loss), "steps": steps}
    runtime = train_output.metrics.get("train_runtime")
    if runtime and steps:
        metrics["seconds_per_step"] = round(float(runtime) / steps, 4)
    if logs:
        metrics["first_loss"] = float(logs[0]["loss"])
        metrics["final_loss"] = float(logs[-1]["loss"])
        last = logs[-1]
        wanted = [*keys, *(k for k in last if k.startswith("rewards/") and k.endswith("/mean"))]
        for key in dict.fromkeys(wanted):
            if last.get(key) is not None:  # TRL logs None for a metric with no valid value in the window
                metrics[key.replace("/", "_")] = float(last[key])
    return metrics


def _save(trainer, tokenizer, final_dir: str | Path) -> None:
    """Save the trained model as a plain model, atomically: LoRA adapters are merged into the weights first, so every
    later stage loads it with from_pretrained. Written to a sibling temp folder and renamed into place by the main
    process; `trainer.save_model` gathers ZeRO-3 shards when run under DeepSpeed. Every process must call this."""
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".{final_dir.name}.tmp-train")
    acc = trainer.accelerator
    if acc.is_main_process:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    model = acc.unwrap_model(trainer.model)
    if _is_peft(model):
        if acc.is_main_process:
            model.merge_and_unload().save_pretrained(tmp)
    else:
        trainer.save_model(str(tmp))  # writes on the main process only
    if acc.is_main_process:
        tokenizer.save_pretrained(tmp)
        if final_dir.exists():  # left by a run killed between rename and registration: same key, same content
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    acc.wait_for_everyone()


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _finish(trainer, tokenizer, keys, save_dir) -> dict[str, float]:
    metrics = _final_metrics(trainer, _timed_train(trainer), keys)
    _save_or_merge(trainer, tokenizer, save_dir)
    return metrics


def _save_or_merge(trainer, tokenizer, save_dir) -> None:
    """Save to `save_dir`; without one, merge LoRA adapters (if any) so the caller's model holds the trained weights."""
    if save_dir is not None:
        _save(trainer, tokenizer, save_dir)
    elif _is_peft(trainer.accelerator.unwrap_model(trainer.model)):
        trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()


@contextmanager
def dropout_set_to(model, p: float) -> Iterator[list[str]]:
    """Within the block, every dropout probability the architecture has is `p`: the config's dropout fields, the
    modules that copied them when built (Llama's attention layers keep `attention_dropout`, its only dropout) and
    nn.Dropout layers (LoRA's own dropout excepted). Yields the config fields set; restores everything on exit, so a
    saved model's config is unchanged."""
    fields = [k for k in DROPOUT_KEYS if isinstance(getattr(model.config, k, None), float | int)]
    old_config = {k: getattr(model.config, k) for k in fields}
    old_attrs, old_layers = [], []
    for name, module in model.named_modules():
        if "lora_" in name:
            continue
        if isinstance(module, torch.nn.Dropout):
            old_layers.append((module, module.p))
            module.p = p
        else:
            for k in fields:
                if isinstance(getattr(module, k, None), float | int) and module is not model:
                    old_attrs.append((module, k, getattr(module, k)))
                    setattr(module, k, p)
    for k in fields:
        setattr(model.config, k, p)
    try:
        yield fields
    finally:
        for k, v in old_config.items():
            setattr(model.config, k, v)
        for module, k, v in old_attrs:
            setattr(module, k, v)
        for module, v in old_layers:
            module.p = v


def causal_lm_train(model, tokenizer, texts: list[str], *, steps: int, lr: float, batch_size: int, max_length: int,
                    device: str, seed: int, save_dir: str | Path | None = None) -> dict[str, float]:
    """Plain next-token training on unlabelled text (how the tiny base model is made)."""
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size, max_length=max_length,
            lr_scheduler_type="cosine", warmup_steps=0.1, dataset_text_field="text",
            **_common_args(device, seed, out),
        )
        trainer = _quiet(SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                    processing_class=tokenizer))
        return _finish(trainer, tokenizer, (), save_dir)


def sft_train(model, tokenizer, examples: list[dict], *, epochs: float, lr: float, batch_size: int, max_length: int,
              device: str, seed: int, lora=None, micro_batch_size: int | None = None,
              save_dir: str | Path | None = None, tracking: dict | None = None) -> dict[str, float]:
    """SFT on {"prompt", "completion"} rows, as chat turns; the loss covers the completion only. With `lora` (a
    LoraConfig that is on) LoRA adapters train and are merged into `model` afterwards."""
    rows = {
        "prompt": [[{"role": "user", "content": e["prompt"]}] for e in examples],
        "completion": [[{"role": "assistant", "content": e["completion"]}] for e in examples],
    }
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            num_train_epochs=epochs, learning_rate=lr, max_length=max_length, **_batches(batch_size, micro_batch_size),
            lr_scheduler_type="cosine", warmup_steps=0.05, **_common_args(device, seed, out, tracking),
        )
        trainer = _quiet(SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                    processing_class=tokenizer, peft_config=peft_lora_config(lora)))
        # TRL drops an example whose prompt alone fills max_length (nothing left to learn): count it, say so
        dropped = len(examples) - len(trainer.train_dataset)
        if dropped:
            logging.getLogger("flywheel").warning(
                "SFT: %d of %d examples dropped: their prompt alone fills max_length=%d (raise it)",
                dropped, len(examples), max_length)
        return {**_finish(trainer, tokenizer, (), save_dir), "examples_dropped_too_long": dropped}


def peft_lora_config(lora):
    """A peft LoraConfig from a `lora` section (None when LoRA is off). 'auto' must be resolved by the caller
    (`LoraConfig.on`) and passed as a copy with `enabled` True or False."""
    if lora is not None and lora.enabled == "auto":
        raise ValueError("lora.enabled 'auto' must be resolved (LoraConfig.on) before training")
    if lora is None or not lora.enabled:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=lora.target_modules, task_type="CAUSAL_LM")


def dpo_train(model, tokenizer, pairs: list[dict], *, beta: float, lr: float, epochs: float, batch_size: int,
              max_length: int, device: str, seed: int, min_lr_ratio: float = 0.1, dropout: float = 0.0,
              lora=None, ref_model=None, nll_weight: float = 0.0, precompute_ref: bool = False,
              micro_batch_size: int | None = None, save_dir: str | Path | None = None,
              tracking: dict | None = None) -> dict[str, float]:
    """DPO on {"prompt", "chosen", "rejected"} rows (plain strings).

    - The learning rate decays by cosine to `min_lr_ratio` of its start (paper: 1e-6 -> 1e-7).
    - `dropout` is set on the policy while it trains (`dropout_set_to`; on Llama that is attention_dropout, on the
      attention probabilities) and the config's values are restored afterwards, so the saved config is unchanged.
      TRL's own dropout switch-off is not used, since it would undo this.
    - `ref_model=None`: the reference is the model as it is now (TRL reloads it from its path; with LoRA, the model
      with adapters disabled, which then runs with the policy's dropout). Otherwise the given model (e.g. M1),
      used in eval mode.
    - `lora` (the `dpo.lora` section): train LoRA adapters through peft, merged into the weights before saving.
    - `nll_weight` > 0 adds that weight times the chosen response's NLL (Iterative RPO, Pang et al. 2024): TRL's
      loss types ["sigmoid", "sft"] with weights [1, nll_weight].
    - `precompute_ref`: the reference log-probs are computed once, before training (TRL's
      precompute_ref_log_probs), so no reference model stays resident and no step runs a second forward pass.
      TRL's DPO computes per-token log-probs with a chunked LM head, never materialising the full logits.
    """
    rows = {
        "prompt": [[{"role": "user", "content": p["prompt"]}] for p in pairs],
        "chosen": [[{"role": "assistant", "content": p["chosen"]}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p["rejected"]}] for p in pairs],
    }
    if ref_model is not None:
        ref_model.eval()
    with tempfile.TemporaryDirectory() as out:
        args = TRLDPOConfig(
            beta=beta, learning_rate=lr, num_train_epochs=epochs, **_batches(batch_size, micro_batch_size),
            max_length=max_length, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": min_lr_ratio}, disable_dropout=False,
            precompute_ref_log_probs=precompute_ref,
            **({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, nll_weight]} if nll_weight else {}),
            **_common_args(device, seed, out, tracking),
        )
        trainer = _quiet(DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_dict(rows),
                                    processing_class=tokenizer, peft_config=peft_lora_config(lora)))
        with dropout_set_to(model, dropout) as fields:
            metrics = _final_metrics(trainer, _timed_train(trainer), DPO_METRICS)
        _save_or_merge(trainer, tokenizer, save_dir)
    metrics["dropout_fields"] = fields
    return metrics


RewardFunc = Callable[..., list[float]]


def process_advantages(steps: list[list[tuple[int, float]]], group: int, length: int) -> torch.Tensor:
    """Process-supervised advantages (DeepSeekMath), [len(steps), length]: per completion, (token index, reward) per
    step; completions in consecutive groups of `group` (one prompt's). A group's step rewards are normalised by the
    mean and std of all of them (a std of 0, or a single step, only subtracts the mean); token t gets the sum of the
    normalised rewards of its completion's steps ending at or after t."""
    out = torch.zeros(len(steps), length)
    for g in range(0, len(steps), group):
        values = torch.tensor([v for rows in steps[g : g + group] for _, v in rows], dtype=torch.float32)
        if not len(values):
            continue
        mean, std = values.mean(), values.std() if len(values) > 1 else torch.tensor(0.0)
        for i in range(g, min(g + group, len(steps))):
            for index, value in steps[i]:
                out[i, index] += (value - mean) / std if std > 0 else value - mean
    return out.flip(1).cumsum(1).flip(1)


class _StepCredit:
    """What both step-credit trainers add to TRL's: the step credit function and its weight, and the completions' step
    advantages (`process_advantages`), [batch, completion length], with the step metrics logged."""

    def __init__(self, *args, step_credit, step_credit_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_credit, self.step_credit_weight = step_credit, step_credit_weight

    def _step_advantages(self, inputs, output) -> torch.Tensor:
        ids, mask = output["completion_ids"], output["completion_mask"]
        rows = [row[: int(n)] for row, n in zip(ids.tolist(), mask.sum(1).tolist())]
        texts = self.processing_class.batch_decode(rows, skip_special_tokens=True)  # as TRL decodes completions
        prompts = [x["prompt"][-1]["content"] if isinstance(x["prompt"], list) else x["prompt"] for x in inputs]
        credits = self.step_credit(prompts, texts, [x.get("reference") for x in inputs])
        local = [steps_at_tokens(self.processing_class, r, c) for r, c in zip(rows, credits)]
        everyone = gather_object(local)  # groups may span processes: normalise over the whole batch, keep ours
        width = max([ids.shape[1], *(i + 1 for s in everyone for i, _ in s)])
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        start = self.accelerator.process_index * len(local)
        advantages = process_advantages(everyone, group, width)[start : start + len(local)]
        values = [v for s in everyone for _, v in s]
        self._metrics[mode]["step_reward"].append(sum(values) / len(values) if values else float("nan"))
        self._metrics[mode]["steps_per_response"].append(len(values) / len(everyone))
        return advantages[:, : ids.shape[1]].to(ids.device) * mask


class StepCreditGRPOTrainer(_StepCredit, GRPOTrainer):
    """GRPO with per-token advantages, outcome + weight * step, [batch, length]: TRL's GRPO loss takes them as they
    are (its `_compute_loss` keeps a 2-d `advantages`)."""

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        step = self._step_advantages(inputs, output)
        output["advantages"] = output["advantages"][:, None] + self.step_credit_weight * step
        return output


class StepCreditRLOOTrainer(_StepCredit, RLOOTrainer):
    """RLOO with step credit. TRL's RLOO loss is sequence-level: one ratio of summed log-probabilities times a (batch,)
    advantage, so a 2-d advantage cannot pass through it. The outcome advantages stay as TRL computes them and the step
    advantages ride beside them (`step_advantages`); `_compute_loss` adds their per-token policy-gradient term,
    -sum_t weight * step_t * exp(logp_t - sg(logp_t)) per completion (the ratio is 1; its gradient is that of
    weight * step_t * logp_t), averaged over completions as RLOO averages its own sequence term, so outcome and step
    advantages act on the same scale; the per-token log-probs are those TRL's loss just computed
    (kept by `_get_per_token_logps_and_entropies`), so no second forward pass. That term is on-policy: exact when the
    completions were sampled by the weights being trained (num_iterations 1 and one generation per optimizer step,
    TRL's defaults and flywheel's), and refused otherwise."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.num_iterations > 1 or self.args.steps_per_generation > self.args.gradient_accumulation_steps:
            raise ValueError("RLOO step credit is on-policy: it needs num_iterations 1 and steps_per_generation <= "
                             "gradient_accumulation_steps")

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        output["step_advantages"] = self.step_credit_weight * self._step_advantages(inputs, output)
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self._last_logps = out[0]
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        logps, mask = self._last_logps, inputs["completion_mask"]
        surrogate = torch.exp(logps - logps.detach()) * inputs["step_advantages"] * mask
        return loss - surrogate.sum(1).mean()


STEP_CREDIT_TRAINERS = {GRPOTrainer: StepCreditGRPOTrainer, RLOOTrainer: StepCreditRLOOTrainer}


def _online_train(config_cls, trainer_cls, model, tokenizer, prompts: list[dict], reward_funcs: list[RewardFunc],
                  c, *, device: str, seed: int, reward_weights: list[float] | None,
                  save_dir: str | Path | None, tracking: dict | None, step_credit=None,
                  step_credit_weight: float = 0.0) -> dict[str, float]:
    if c.batch_size % c.num_generations:
        raise ValueError(f"batch_size ({c.batch_size}) must be a multiple of num_generations ({c.num_generations}): "
                         "each step samples whole groups of completions per prompt")
    if not reward_funcs:
        raise ValueError("no reward functions: set reward.coherent or add reward.rules")
    for f in reward_funcs:
        if not getattr(f, "__name__", None):
            raise ValueError(f"reward function {f!r} has no __name__ (TRL names its metrics by it)")
    rows = {"prompt": [[{"role": "user", "content": p["prompt"]}] for p in prompts],
            "reference": [p.get("reference") for p in prompts]}
    credit = {}
    if step_credit is not None:
        trainer_cls = STEP_CREDIT_TRAINERS[trainer_cls]
        credit = {"step_credit": step_credit, "step_credit_weight": step_credit_weight}
    with tempfile.TemporaryDirectory() as out:
        args = config_cls(
            learning_rate=c.learning_rate, num_generations=c.num_generations, per_device_train_batch_size=c.batch_size,
            max_steps=c.max_steps, beta=c.beta, temperature=c.temperature,
            max_completion_length=c.max_completion_length, reward_weights=reward_weights,
            **_common_args(device, seed, out, tracking),
        )
        trainer = _quiet(trainer_cls(model=model, reward_funcs=list(reward_funcs), args=args,
                                     train_dataset=Dataset.from_dict(rows), processing_class=tokenizer, **credit))
        return _finish(trainer, tokenizer, ONLINE_METRICS, save_dir)


def grpo_train(model, tokenizer, prompts: list[dict], reward_funcs: list[RewardFunc], cfg_section, *, device: str,
               seed: int, reward_weights: list[float] | None = None, save_dir: str | Path | None = None,
               tracking: dict | None = None, step_credit=None, step_credit_weight: float = 0.0) -> dict[str, float]:
    """GRPO (TRL) on {"prompt", "reference"} rows: `num_generations` samples per prompt, advantages relative to the
    group, a KL penalty of `beta` against the starting model (0 loads no reference). `cfg_section`: OnlineRLConfig.
    `step_credit(prompts, completions, references)`: step rewards, credited with `step_credit_weight` (docstring)."""
    return _online_train(GRPOConfig, GRPOTrainer, model, tokenizer, prompts, reward_funcs, cfg_section,
                         device=device, seed=seed, reward_weights=reward_weights, save_dir=save_dir, tracking=tracking,
                         step_credit=step_credit, step_credit_weight=step_credit_weight)


def rloo_train(model, tokenizer, prompts: list[dict], reward_funcs: list[RewardFunc], cfg_section, *, device: str,
               seed: int, reward_weights: list[float] | None = None, save_dir: str | Path | None = None,
               tracking: dict | None = None, step_credit=None, step_credit_weight: float = 0.0) -> dict[str, float]:
    """RLOO (TRL): as `grpo_train`, with each sample's baseline the mean reward of the other samples of its prompt."""
    return _online_train(RLOOConfig, RLOOTrainer, model, tokenizer, prompts, reward_funcs, cfg_section,
                         device=device, seed=seed, reward_weights=reward_weights, save_dir=save_dir, tracking=tracking,
                         step_credit=step_credit, step_credit_weight=step_credit_weight)
