"""GRPO and RLOO (online RL through TRL) on the iteration's kept prompts.

    GRPO.stage(ctx, state)       # reads state.prompts (self-instruct stage run), state.model; state.m1/pt if coherent

They train with `flywheel.signals.reward_functions`: the signals given a weight in `reward.weights` (the coherent
reward, which loads the SFT and PT models; rule rewards, which read each prompt's `reference`), combined by TRL with
those weights. The KL anchor (when the section's beta > 0) is the starting policy, M_t.

Step credit (opt-in: `steps.credit` > 0, with `steps.split` and `steps.rule`): beside the sequence-level rewards, the
step rule scores each completion's steps and the trainers add process-supervised per-token advantages, weighted by
`steps.credit` (flywheel/training/loops.py: `process_advantages`). The `steps` section then joins the stage's inputs.
"""

from __future__ import annotations

from ..config import ConfigError, FlywheelConfig, OnlineRLConfig
from ..registry import Registry
from ..registry.datasets import DatasetError, stage_version
from ..registry.integrity import model_path
from ..registry.reads import kept_prompts
from ..signals import online_signals, reward_functions, reward_weights
from ..stage import IterationState, StageContext, StageResult
from ..stages.steps import online_step_rewards
from .common import coherent_models, loops, process_device, train_stage
from .job import NoTrainingDataError, Trainer, TrainJob


def online_stage(trainer: Trainer, ctx: StageContext, state: IterationState) -> StageResult:
    cfg, name, model_id = ctx.cfg, trainer.name, state.model
    c: OnlineRLConfig = getattr(cfg, trainer.section)
    if c.batch_size % c.num_generations:
        raise ConfigError(f"{name}.batch_size ({c.batch_size}) must be a multiple of {name}.num_generations "
                          f"({c.num_generations})")
    coherent = any(signal == "coherent" for signal, _ in online_signals(cfg))
    if coherent and not (state.m1 and state.pt):
        raise ValueError(f"{name}: reward.coherent needs the SFT and PT model ids")
    inputs = {"model": model_id, "prompts": state.prompts, "cfg": c.model_dump(mode="json"),
              "reward": cfg.reward.model_dump(mode="json"), "sft": state.m1 if coherent else None,
              "pt": state.pt if coherent else None, "seed": cfg.run.seed}
    if cfg.steps.credit > 0:  # only then: the stage ids of runs without step credit stay what they were
        inputs["steps"] = cfg.steps.model_dump(mode="json")

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        rows = kept_prompts(reg, state.prompts)
        if not rows:
            raise NoTrainingDataError(f"{name} (iteration {ctx.iteration}): stage run {state.prompts} kept no prompts")
        paths = {}
        if coherent:
            paths = {"sft_path": model_path(reg, state.m1), "pt_path": model_path(reg, state.pt)}
        job = TrainJob(name, model_path(reg, model_id), str(reg.model_dir(sid)),
                       [{"prompt": r["prompt"], "reference": r["reference"]} for r in rows], **paths)
        return job, {"ref_model_id": model_id if c.beta else None,  # TRL's KL anchor: the starting policy
                     "dataset_version": prompts_version(reg, state.prompts),
                     "stats": {"prompts": len(rows), "with_reference": sum(r["reference"] is not None for r in rows)}}

    return train_stage(ctx, trainer, model_id, inputs, make_job)


def prompts_version(reg: Registry, prompts_sid: str) -> str | None:
    """The frozen prompts version an online trainer reads (None for prompts written outside a stage)."""
    try:
        return stage_version(reg, prompts_sid, "prompts")
    except DatasetError:
        return None


def _fit(trainer: str, loop: str):
    def fit(cfg: FlywheelConfig, job: TrainJob, model, tokenizer, **common) -> dict:
        sft, pt = coherent_models(job, common["device"])
        funcs = reward_functions(cfg, sft, pt, tokenizer, process_device(common["device"]))
        weights = reward_weights(cfg)
        metrics = getattr(loops(), loop)(model, tokenizer, job.rows, funcs, getattr(cfg, trainer),
                                         reward_weights=weights, tracking=job.tracking,
                                         step_credit=online_step_rewards(cfg), step_credit_weight=cfg.steps.credit,
                                         **common)
        return {**metrics, "train_config_extra": {"reward_functions": {f.__name__: w for f, w in zip(funcs, weights)}}}

    return fit


def train_grpo(ctx: StageContext, state: IterationState) -> StageResult:
    """GRPO on the kept prompts of `state.prompts` (section `grpo`); M_t -> M_{t+1}, kind "grpo"."""
    return online_stage(GRPO, ctx, state)


def train_rloo(ctx: StageContext, state: IterationState) -> StageResult:
    """RLOO on the kept prompts of `state.prompts` (section `rloo`); M_t -> M_{t+1}, kind "rloo"."""
    return online_stage(RLOO, ctx, state)


GRPO = Trainer("grpo", section="grpo", consumes=("prompts",), stage=train_grpo, fit=_fit("grpo", "grpo_train"))
RLOO = Trainer("rloo", section="rloo", consumes=("prompts",), stage=train_rloo, fit=_fit("rloo", "rloo_train"))
