"""DPO (TRL) on the iteration's frozen training set (dataset version `train`): M_t -> M_{t+1}.

    TRAINER.stage(ctx, state)      # reads state.pairs (the pairs stage run), state.model (M_t), state.m1
                                   # and state.judge_pairs (the meta-judge stage run) when it ran

Settings come from the `dpo` section (paper defaults: beta 0.1, lr 1e-6 decaying by cosine to `min_lr_ratio` of it,
batch 16, dropout 0.1, which on Llama is attention_dropout). `dpo.reference`: `previous` trains against M_t (TRL keeps
a frozen copy), `m1` against M1 throughout. `dpo.lora.enabled` trains LoRA adapters through peft and merges them into
the weights before saving, so every later stage loads a plain model. The model row records its reference model, the
dataset version it read (flywheel/registry/datasets.py), the `dpo` section as train_config (plus the dropout fields it set) and
the final metrics.

With the meta-judge (`meta_judge.enabled`, flywheel/stages/meta_judge.py) the rows are the actor pairs plus its
judge-preference pairs (version `judge_pairs`; the first `meta_judge.max_pairs` of them, in candidate-id order, a
fixed pseudo-random subset), shuffled with the run's seed; the stage's stats count each kind. Without it the stage's
inputs and rows are what they were before the meta-judge existed.
"""

from __future__ import annotations

import json
import random

from ..backends.models import load, resolve_device
from ..config import FlywheelConfig
from ..registry import Registry
from ..registry.datasets import read_version, stage_version
from ..registry.integrity import model_path
from ..stage import IterationState, StageContext, StageResult
from .common import loops, train_stage
from .job import NoTrainingDataError, Trainer, TrainJob


def dpo_key(cfg: FlywheelConfig) -> dict:
    """The `dpo` section as it decides the model: LoRA's 'auto' resolved for this device (CPU and GPU train
    differently), and the reference log-probs' precompute named only when on."""
    c = cfg.dpo
    key = c.model_dump(mode="json", exclude={"precompute_ref_log_probs"})
    key["lora"] = c.lora.resolved(resolve_device(cfg.run.device), cfg.scratch).model_dump(mode="json")
    if c.precompute(cfg.scratch):
        key["precompute_ref_log_probs"] = True
    return key


def train_dpo(ctx: StageContext, state: IterationState) -> StageResult:
    """M_{t+1} = DPO of M_t (`state.model`) on the pairs of `state.pairs`; `state.m1` when `dpo.reference` is m1."""
    cfg, model_id = ctx.cfg, state.model
    if cfg.dpo.reference == "m1" and not state.m1:
        raise ValueError("dpo.reference is 'm1' but the iteration state has no M1")
    ref_model_id = state.m1 if cfg.dpo.reference == "m1" else model_id
    inputs = {"model": model_id, "pairs": state.pairs, "cfg": dpo_key(cfg), "seed": cfg.run.seed,
              "ref": ref_model_id}
    if state.judge_pairs:  # only then: runs without the meta-judge keep their stage ids
        inputs.update(judge_pairs=state.judge_pairs, max_judge_pairs=cfg.meta_judge.max_pairs)

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        version = stage_version(reg, state.pairs, "train")  # the frozen training set, hash-checked on read
        rows = read_version(reg, version).to_pylist()
        training_pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        judge_rows, extra = judge_pairs(reg, state.judge_pairs, cfg.meta_judge.max_pairs)
        if not training_pairs and not judge_rows:
            stats = json.loads(reg.scalar("SELECT stats FROM stage_runs WHERE stage_run_id = ?", [state.pairs]) or "{}")
            why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (stats.get("unpaired") or {}).items() if v)
            raise NoTrainingDataError(
                f"iteration {ctx.iteration} produced no preference pairs (prompts without a pair: {why or 'none'}). "
                "More candidates (generate.n), more judge samples (judge.samples), a judge template the model can "
                "answer, or a lower pairs.min_margin make pairs; `flywheel report` shows the judge's parse failures")
        stats = {"pairs": len(training_pairs), **extra}
        if state.judge_pairs:  # the actor's and the judge's pairs, mixed
            training_pairs = training_pairs + judge_rows
            random.Random(cfg.run.seed).shuffle(training_pairs)
        ref_path = model_path(reg, ref_model_id) if ref_model_id != model_id else None  # None: TRL copies M_t
        job = TrainJob("dpo", model_path(reg, model_id), str(reg.model_dir(sid)), training_pairs, ref_path=ref_path)
        return job, {"ref_model_id": ref_model_id, "dataset_version": version, "stats": stats}

    return train_stage(ctx, TRAINER, model_id, inputs, make_job)


def judge_pairs(reg: Registry, meta_sid: str | None, cap: int | None) -> tuple[list[dict], dict]:
    """(the first `cap` rows of the meta-judge stage run's frozen judge_pairs version, what to record in the stats);
    ([], {}) without a meta-judge stage."""
    if not meta_sid:
        return [], {}
    version = stage_version(reg, meta_sid, "judge_pairs")
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_version(reg, version).to_pylist()]
    return rows[:cap], {"judge_pairs": len(rows[:cap]), "judge_pairs_frozen": len(rows),
                        "judge_pairs_version": version}


def fit_dpo(cfg: FlywheelConfig, job: TrainJob, model, tokenizer, **common) -> dict:
    c = cfg.dpo
    ref = load(job.ref_path, common["device"], train=True)[0] if job.ref_path else None
    lora = c.lora.resolved(common["device"], cfg.scratch)
    precompute = c.precompute(cfg.scratch)
    metrics = loops().dpo_train(model, tokenizer, job.rows, beta=c.beta, lr=c.learning_rate, epochs=c.epochs,
                              batch_size=c.batch_size, max_length=c.max_length, min_lr_ratio=c.min_lr_ratio,
                              dropout=c.dropout, lora=lora, ref_model=ref, nll_weight=c.nll_weight,
                              precompute_ref=precompute, micro_batch_size=c.micro_batch_size,
                              tracking=job.tracking, **common)
    extra = {"dropout_applied_to": metrics.pop("dropout_fields"),
             "lora": lora.model_dump(mode="json"),  # with 'auto' decided
             "precompute_ref_log_probs": precompute}
    return {**metrics, "train_config_extra": extra}


TRAINER = Trainer("dpo", section="dpo", consumes=("pairs", "judge_pairs"), stage=train_dpo, fit=fit_dpo)
