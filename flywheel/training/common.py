"""What every trainer's stage does alike: `train_stage` (run the job, register the model) and `run_job`.

A trainer's stage reads its training rows from the registry into a TrainJob and calls `train_stage`, which frees the
generation model, runs the job (`run_job`: load M_t with `flywheel.backends.models.load`, call the trainer's `fit`, which saves
M_{t+1} atomically), checks it (`flywheel.registry.integrity.accept_model`: NaN/inf weights or a non-finite final
loss fail the stage, and the folder is deleted), then registers the model with its weights' sha256, reference model,
dataset version, train config and metrics. A finished stage whose model folder has gone (deleted, or moved aside
after `flywheel verify` found it altered) trains it again under the same id (`integrity.reopen_if_missing`).

`run_job` runs in this process (`train.launch.mode: inprocess`) or in a child started by `accelerate launch`
(`accelerate`: see launch.py), which then also frees the GPU memory when training ends, or in the workers of a Ray
Train job (`ray`: launch.py too). Neither opens the registry: DuckDB allows one writing process, and under several
GPU processes only the parent may.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

from ..backends import release_backends
from ..backends.models import load, resolve_device
from ..config import FlywheelConfig
from ..registry import Registry
from ..registry.integrity import accept_model, reopen_if_missing
from ..stage import StageContext, StageResult, run_stage, stage_run_id
from ..tracking import training
from .job import Fit, NoTrainingDataError, Trainer, TrainJob
from .launch import run_accelerate, run_ray


def train_stage(ctx: StageContext, trainer: Trainer, model_id: str, inputs: dict,
                make_job: Callable[[Registry, str], tuple[TrainJob, dict]]) -> StageResult:
    """Load, train, save atomically, register. `make_job(reg, sid)` reads the training rows and returns the job and
    what to record: {"dataset_version": ..., "ref_model_id": ..., "stats": {...}} (all optional). A job without rows
    is refused with NoTrainingDataError."""
    cfg, iteration = ctx.cfg, ctx.iteration

    def work(reg: Registry, sid: str) -> dict:
        job, record = make_job(reg, sid)
        if not job.rows:
            raise NoTrainingDataError(f"{trainer.name} (iteration {iteration}): no training rows")
        release_backends()  # a loaded generation model would share the GPU with training
        reg.release()  # nor does training need the registry: readers get in meanwhile
        name = f"M{iteration + 1}"
        with training(cfg, ctx.run_id, f"{name}-{trainer.name}") as tracking:  # train.report_to
            job.tracking = tracking
            if cfg.train.launch.mode == "accelerate":
                metrics = run_accelerate(cfg, job, reg.root / "jobs" / sid)
            elif cfg.train.launch.mode == "ray":
                metrics = run_ray(cfg, job, reg.root / "jobs" / sid)
            else:
                metrics = run_job(cfg, job, trainer.fit)
        setting, value = learning_rate_setting(cfg, trainer, iteration)
        sha = accept_model(job.out_dir, metrics, what=f"{name} ({trainer.name}, iteration {iteration}, stage {sid})",
                           hint=f"The learning rate is probably too high: lower {setting} (now {value}).")
        train_config = {**getattr(cfg, trainer.section).model_dump(mode="json"),
                        **metrics.pop("train_config_extra", {})}
        reg.register_model(model_id=sid, run_id=ctx.run_id, name=name, kind=trainer.name,
                           iteration=iteration, parent_id=model_id, path=job.out_dir, stage_run_id=sid,
                           config_hash=cfg.config_hash(), metrics={**record.get("stats", {}), **metrics},
                           ref_model_id=record.get("ref_model_id"), dataset_version=record.get("dataset_version"),
                           train_config=train_config, weights_sha256=sha)
        return {"model_id": sid, "path": job.out_dir, **record.get("stats", {}), **metrics}

    with ctx.registry() as reg:
        reopen_if_missing(reg, stage_run_id(trainer.name, inputs))
    return run_stage(cfg, trainer.name, ctx.run_id, iteration, model_id, inputs, work)


def learning_rate_setting(cfg: FlywheelConfig, trainer: Trainer, iteration: int) -> tuple[str, float]:
    """(the setting, its value) of the learning rate a trainer's stage trains with: what a diverged run should lower."""
    if trainer.section == "sft" and iteration > 0:  # the plain-SFT baseline
        return "sft.baseline_learning_rate", cfg.sft.baseline_learning_rate or cfg.dpo.learning_rate
    return f"{trainer.section}.learning_rate", getattr(cfg, trainer.section).learning_rate


def run_job(cfg: FlywheelConfig, job: TrainJob, fit: Fit) -> dict:
    """Load M_t, train it with `fit`, save it to `job.out_dir`; the final metrics. Runs in this process or in the
    `accelerate launch` child (`flywheel.training.entry`)."""
    device = resolve_device(cfg.run.device)
    model, tokenizer = load(job.model_path, device, train=True)
    metrics = fit(cfg, job, model, tokenizer, device=device, seed=cfg.run.seed, save_dir=job.out_dir)
    del model
    free_memory()
    return {"train_config_extra": {}, **metrics}


def loops():
    """flywheel.training.loops, imported when a job runs: it loads torch, transformers and TRL."""
    from . import loops as module

    return module


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def coherent_models(job: TrainJob, device_kind: str) -> tuple[Any, Any]:
    """The SFT and PT models of a job with the coherent reward (eval mode, on this process's device), else Nones."""
    device = process_device(device_kind)
    sft = load(job.sft_path, device_kind, train=True)[0].to(device).eval() if job.sft_path else None
    pt = load(job.pt_path, device_kind, train=True)[0].to(device).eval() if job.pt_path else None
    return sft, pt


def process_device(device_kind: str) -> str:
    """This process's device: "cpu", or its own GPU under `accelerate launch` (cuda:<local rank>)."""
    if device_kind == "cpu":
        return "cpu"
    from accelerate import PartialState

    return str(PartialState().device)


