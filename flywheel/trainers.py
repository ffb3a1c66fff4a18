"""Trainer stages besides DPO: GRPO, RLOO (online RL through TRL) and rejection-sampling SFT; and the shape they share.

    train_grpo(cfg, run_id, iteration, model_id, prompts_sid, sft_model_id, pt_model_id)   # kind "grpo"
    train_rloo(cfg, run_id, iteration, model_id, prompts_sid, sft_model_id, pt_model_id)   # kind "rloo"
    train_rs_sft(cfg, run_id, iteration, model_id, judge_sid, reward_sid)                   # kind "rs-sft"
    train_seed_sft(cfg, run_id, iteration, model_id, seeds_sid)                              # kind "sft" (baseline)

Every trainer stage has one shape (`train_stage`): read its training rows from the registry into a TrainJob (plain
values, `flywheel.launch`), run the job, save M_{t+1} atomically, register it with its reference model, dataset
version, train config and final metrics. `run_job` is the one place that loads models and calls `flywheel.train`; it runs in this process
(`train.launch.mode: inprocess`) or in a child started by `accelerate launch` (`accelerate`: see `flywheel.launch`),
which then also frees the GPU memory when training ends. The child never opens the registry: DuckDB allows one
writing process, and under several GPU processes only the parent may.

GRPO/RLOO train on the kept prompts of a self-instruct (or seeds) stage with `flywheel.rewards.reward_functions`:
the signals given a weight in `reward.weights` (the coherent reward, which loads the SFT and PT models; rule rewards,
which read each prompt's `reference`), combined by TRL with those weights. RS-SFT takes, per prompt, the candidate
with the best combined score (`flywheel.pairs.combined_scores`; ties to the larger candidate id, as pairs does),
drops those under `rs_sft.min_score`, and fine-tunes M_t on them.
"""

from __future__ import annotations

import gc
import random
from typing import Callable

from .backends import release_backends
from .datasets import DatasetError, stage_version
from .config import ConfigError, FlywheelConfig, OnlineRLConfig, content_hash
from .launch import SECTIONS, TrainJob, run_accelerate
from .models import resolve_device
from .registry import Registry
from .rewards import online_signals, reward_weights
from .stage import StageResult, load_template, run_stage


class NoTrainingDataError(RuntimeError):
    """A trainer stage found nothing to train on; the message says where to look."""


# --- the shared stage shape ----------------------------------------------------------------------------------------

def train_stage(cfg: FlywheelConfig, trainer: str, run_id: str, iteration: int, model_id: str, inputs: dict,
                make_job: Callable[[Registry, str], tuple[TrainJob, dict]]) -> StageResult:
    """Load, train, save atomically, register. `make_job(reg, sid)` reads the training rows and returns the job and
    what to record: {"dataset_version": ..., "ref_model_id": ..., "stats": {...}} (all optional)."""

    def work(reg: Registry, sid: str) -> dict:
        job, record = make_job(reg, sid)
        if not job.rows:
            raise NoTrainingDataError(f"{trainer} (iteration {iteration}): no training rows")
        release_backends()  # a loaded generation model would share the GPU with training
        if cfg.train.launch.mode == "accelerate":
            metrics = run_accelerate(cfg, job, reg.root / "jobs" / sid)
        else:
            metrics = run_job(cfg, job)
        train_config = {**getattr(cfg, SECTIONS[trainer]).model_dump(mode="json"),
                        **metrics.pop("train_config_extra", {})}
        reg.register_model(model_id=sid, run_id=run_id, name=f"M{iteration + 1}", kind=trainer, iteration=iteration,
                           parent_id=model_id, path=job.out_dir, stage_run_id=sid, config_hash=cfg.config_hash(),
                           metrics={**record.get("stats", {}), **metrics}, ref_model_id=record.get("ref_model_id"),
                           dataset_version=record.get("dataset_version"), train_config=train_config)
        return {"model_id": sid, "path": job.out_dir, **record.get("stats", {}), **metrics}

    return run_stage(cfg, trainer, run_id, iteration, model_id, inputs, work)


def run_job(cfg: FlywheelConfig, job: TrainJob) -> dict:
    """Load M_t (and what the trainer needs besides), train, save to `job.out_dir`. Returns the final metrics; what
    belongs in the model's train_config rather than its metrics comes back under "train_config_extra"."""
    from . import train

    device = resolve_device(cfg.run.device)
    model, tokenizer = _load(job.model_path, device)
    common = dict(device=device, seed=cfg.run.seed, save_dir=job.out_dir)
    extra: dict = {}
    if job.trainer == "dpo":
        c = cfg.dpo
        ref = _load(job.ref_path, device)[0] if job.ref_path else None
        lora = c.lora.resolved(device, cfg.scratch)
        precompute = c.precompute(cfg.scratch)
        metrics = train.dpo_train(model, tokenizer, job.rows, beta=c.beta, lr=c.learning_rate, epochs=c.epochs,
                                  batch_size=c.batch_size, max_length=c.max_length, min_lr_ratio=c.min_lr_ratio,
                                  dropout=c.dropout, lora=lora, ref_model=ref, nll_weight=c.nll_weight,
                                  precompute_ref=precompute, micro_batch_size=c.micro_batch_size, **common)
        extra["dropout_applied_to"] = metrics.pop("dropout_fields")
        extra["lora"] = lora.model_dump(mode="json")  # with 'auto' decided
        extra["precompute_ref_log_probs"] = precompute
    elif job.trainer in ("grpo", "rloo"):
        c: OnlineRLConfig = getattr(cfg, job.trainer)
        funcs, weights = _reward_functions(cfg, job, tokenizer)
        fit = train.grpo_train if job.trainer == "grpo" else train.rloo_train
        metrics = fit(model, tokenizer, job.rows, funcs, c, reward_weights=weights, **common)
        extra["reward_functions"] = {f.__name__: w for f, w in zip(funcs, weights)}
    elif job.trainer == "rs-sft":
        c = cfg.rs_sft
        metrics = train.sft_train(model, tokenizer, job.rows, epochs=c.epochs, lr=c.learning_rate,
                                  batch_size=c.batch_size, max_length=c.max_length, **common)
    elif job.trainer == "sft":  # the rows are already the iteration's budget: one pass
        c = cfg.sft
        metrics = train.sft_train(model, tokenizer, job.rows, epochs=1,
                                  lr=baseline_learning_rate(cfg),
                                  batch_size=cfg.dpo.batch_size, max_length=c.max_length, **common)
    else:
        raise ValueError(f"unknown trainer {job.trainer!r}; known: {sorted(SECTIONS)}")
    del model
    _free()
    return {**metrics, "train_config_extra": extra}


def _load(path: str, device: str):
    """(model, tokenizer) for training. The model stays on the CPU: the Trainer (or DeepSpeed) places it, one device
    per process under `accelerate launch`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer


def _reward_functions(cfg: FlywheelConfig, job: TrainJob, tokenizer) -> tuple[list, list[float]]:
    from accelerate import PartialState

    from .rewards import reward_functions

    kind = resolve_device(cfg.run.device)
    device = "cpu" if kind == "cpu" else str(PartialState().device)  # this process's own GPU under accelerate launch
    sft = _load(job.sft_path, kind)[0].to(device).eval() if job.sft_path else None
    pt = _load(job.pt_path, kind)[0].to(device).eval() if job.pt_path else None
    return reward_functions(cfg, sft, pt, tokenizer, device), reward_weights(cfg)


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the stages ----------------------------------------------------------------------------------------------------

def _online_stage(trainer: str, cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, prompts_sid: str,
                  sft_model_id: str | None, pt_model_id: str | None) -> StageResult:
    c: OnlineRLConfig = getattr(cfg, trainer)
    if c.batch_size % c.num_generations:
        raise ConfigError(f"{trainer}.batch_size ({c.batch_size}) must be a multiple of {trainer}.num_generations "
                          f"({c.num_generations})")
    coherent = any(name == "coherent" for name, _ in online_signals(cfg))
    if coherent and not (sft_model_id and pt_model_id):
        raise ValueError(f"{trainer}: reward.coherent needs the SFT and PT model ids")
    inputs = {"model": model_id, "prompts": prompts_sid, "cfg": c.model_dump(mode="json"),
              "reward": cfg.reward.model_dump(mode="json"), "sft": sft_model_id if coherent else None,
              "pt": pt_model_id if coherent else None, "seed": cfg.run.seed}

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        rows = reg.rows("SELECT prompt_id, text AS prompt, reference FROM prompts "
                        "WHERE stage_run_id = ? AND kept ORDER BY prompt_id", [prompts_sid])
        if not rows:
            raise NoTrainingDataError(f"{trainer} (iteration {iteration}): stage run {prompts_sid} kept no prompts")
        paths = {}
        if coherent:
            paths = {"sft_path": reg.model(sft_model_id)["path"], "pt_path": reg.model(pt_model_id)["path"]}
        job = TrainJob(trainer, reg.model(model_id)["path"], str(reg.model_dir(sid)),
                       [{"prompt": r["prompt"], "reference": r["reference"]} for r in rows], **paths)
        return job, {"ref_model_id": model_id if c.beta else None,  # TRL's KL anchor: the starting policy
                     "dataset_version": _prompts_version(reg, prompts_sid),
                     "stats": {"prompts": len(rows), "with_reference": sum(r["reference"] is not None for r in rows)}}

    return train_stage(cfg, trainer, run_id, iteration, model_id, inputs, make_job)


def train_grpo(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, prompts_sid: str,
               sft_model_id: str | None = None, pt_model_id: str | None = None) -> StageResult:
    """GRPO on the kept prompts of `prompts_sid` (section `grpo`); M_t -> M_{t+1}, kind "grpo"."""
    return _online_stage("grpo", cfg, run_id, iteration, model_id, prompts_sid, sft_model_id, pt_model_id)


def train_rloo(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, prompts_sid: str,
               sft_model_id: str | None = None, pt_model_id: str | None = None) -> StageResult:
    """RLOO on the kept prompts of `prompts_sid` (section `rloo`); M_t -> M_{t+1}, kind "rloo"."""
    return _online_stage("rloo", cfg, run_id, iteration, model_id, prompts_sid, sft_model_id, pt_model_id)


def _prompts_version(reg, prompts_sid: str) -> str | None:
    """The frozen prompts version the online trainers read (None for prompts written outside a stage)."""
    try:
        return stage_version(reg, prompts_sid, "prompts")
    except DatasetError:
        return None


def best_of_n(scored: list[dict], min_score: float | None = None) -> tuple[list[dict], int]:
    """Per prompt, the row with the highest `score` (ties: the larger candidate_id, as the pairs stage breaks them).
    Returns (the best rows at or above `min_score`, how many prompts' best fell below it)."""
    best: dict[str, dict] = {}
    for row in scored:
        cur = best.get(row["prompt_id"])
        if cur is None or (row["score"], row["candidate_id"]) > (cur["score"], cur["candidate_id"]):
            best[row["prompt_id"]] = row
    chosen = [best[p] for p in sorted(best)]
    kept = [r for r in chosen if min_score is None or r["score"] >= min_score]
    return kept, len(chosen) - len(kept)


def train_rs_sft(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, judge_sid: str,
                 reward_sid: str | None = None) -> StageResult:
    """Rejection-sampling fine-tuning: SFT of M_t on the best candidate per prompt by the combined score; kind
    "rs-sft". `min_score` is on the combined score's scale (the judge's 0-5 when it is the only signal, else a
    weighted sum of per-prompt z-scores)."""
    from .pairs import combined_scores

    c = cfg.rs_sft
    inputs = {"model": model_id, "judgments": judge_sid, "rewards": reward_sid, "cfg": c.model_dump(mode="json"),
              "weights": cfg.reward.weights, "seed": cfg.run.seed}

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        scored = combined_scores(reg, cfg, judge_sid=judge_sid, reward_sid=reward_sid)
        kept, below = best_of_n(scored, c.min_score)
        if not kept:
            raise NoTrainingDataError(
                f"rs-sft (iteration {iteration}): no candidate to train on ({len(scored)} scored, {below} prompts' "
                f"best below rs_sft.min_score={c.min_score}); see the judge stage's parse failures")
        rows = [{"prompt_id": r["prompt_id"], "candidate_id": r["candidate_id"], "score": float(r["score"]),
                 "prompt": r["prompt"], "completion": r["text"]} for r in kept]
        job = TrainJob("rs-sft", reg.model(model_id)["path"], str(reg.model_dir(sid)),
                       [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
        return job, {"dataset_version": f"rs-sft-{content_hash(rows)}",
                     "stats": {"examples": len(rows), "prompts_scored": len({r["prompt_id"] for r in scored}),
                               "below_min_score": below,
                               "mean_score": round(sum(r["score"] for r in rows) / len(rows), 4)}}

    return train_stage(cfg, "rs-sft", run_id, iteration, model_id, inputs, make_job)


def baseline_budget(cfg: FlywheelConfig) -> int:
    """Examples per iteration of the plain-SFT baseline (`sft.baseline_examples`, see its description)."""
    return cfg.sft.baseline_examples or 2 * cfg.self_instruct.num_prompts * max(1, round(cfg.dpo.epochs))


def baseline_learning_rate(cfg: FlywheelConfig) -> float:
    """The plain-SFT baseline's learning rate: `sft.baseline_learning_rate`, else DPO's."""
    return cfg.sft.baseline_learning_rate or cfg.dpo.learning_rate


def train_seed_sft(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, seeds_sid: str) -> StageResult:
    """The plain-SFT baseline: M_{t+1} = M_t fine-tuned further on M1's own SFT data (the seeds' IFT and EFT), with
    no generation, judging or pairs; kind "sft". It gets `baseline_budget` examples per iteration (the seed examples
    in a seeded shuffle, cycled), so it trains on as many sequences as a DPO iteration can, at DPO's batch size and
    (unless `sft.baseline_learning_rate` is set) learning rate."""
    from .bootstrap import sft_examples  # bootstrap imports the training stack: only when this trainer runs

    with Registry(cfg.registry.root) as reg:
        judge_text, judge_hash = load_template(reg, cfg.judge.template, "judge")
    budget = baseline_budget(cfg)
    inputs = {"model": model_id, "seeds": seeds_sid, "sft": cfg.sft.model_dump(mode="json"), "examples": budget,
              "lr": baseline_learning_rate(cfg), "batch_size": cfg.dpo.batch_size,
              "eft": cfg.seeds.eft, "judge_template": judge_hash, "seed": cfg.run.seed}

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        examples, counts = sft_examples(reg, seeds_sid, judge_text, eft=cfg.seeds.eft, seed=cfg.run.seed,
                                        verdict_only=cfg.judge.mode == "prob")
        order = list(range(len(examples)))
        random.Random(content_hash([sid, cfg.run.seed])).shuffle(order)
        rows = [examples[order[i % len(order)]] for i in range(budget)] if examples else []
        job = TrainJob("sft", reg.model(model_id)["path"], str(reg.model_dir(sid)), rows)
        return job, {"dataset_version": f"sft-{content_hash(rows)}",
                     "stats": {"examples": len(rows), "seed_examples": len(examples), "ift": counts["ift"],
                               "eft": counts["eft"]}}

    return train_stage(cfg, "sft", run_id, iteration, model_id, inputs, make_job)
