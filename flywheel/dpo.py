"""Train: DPO (TRL) on the iteration's frozen training set (dataset version `train`) turns M_t into M_{t+1}.

    train_dpo(cfg, run_id, iteration, model_id, pairs, m1_id)

Settings come from the `dpo` section (paper defaults: beta 0.1, lr 1e-6 decaying by cosine to `min_lr_ratio` of it,
batch 16, dropout 0.1, which on Llama is attention_dropout). `dpo.reference`: `previous` trains against M_t (TRL keeps
a frozen copy), `m1` against M1 throughout. `dpo.lora.enabled` trains LoRA adapters through peft and merges them into
the weights before saving, so every later stage loads a plain model. The model row records its reference model, the
dataset version it read (see flywheel/datasets.py), the `dpo` section as train_config (plus the dropout fields it set) and the
final metrics. The load-train-save-register shape is `flywheel.trainers.train_stage`; with
`train.launch.mode: accelerate` training runs in an `accelerate launch` child process.
"""

from __future__ import annotations

from .config import FlywheelConfig
from .datasets import read_version, stage_version
from .models import resolve_device
from .registry import Registry
from .stage import StageResult
from .launch import TrainJob
from .trainers import train_stage


class NoPairsError(RuntimeError):
    pass


def dpo_key(cfg: FlywheelConfig) -> dict:
    """The `dpo` section as it decides the model: LoRA's 'auto' resolved for this device (CPU and GPU train
    differently), and the reference log-probs' precompute named only when on."""
    c = cfg.dpo
    key = c.model_dump(mode="json", exclude={"precompute_ref_log_probs"})
    key["lora"] = c.lora.resolved(resolve_device(cfg.run.device), cfg.scratch).model_dump(mode="json")
    if c.precompute(cfg.scratch):
        key["precompute_ref_log_probs"] = True
    return key


def train_dpo(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, pairs: StageResult,
              m1_id: str | None = None) -> StageResult:
    """`pairs` is the pairs stage's result: its id and the hash of the snapshot it froze. `m1_id` is needed when
    `dpo.reference` is `m1`."""
    c = cfg.dpo
    if c.reference == "m1" and not m1_id:
        raise ValueError("dpo.reference is 'm1' but train_dpo was not given m1_id")
    ref_model_id = m1_id if c.reference == "m1" else model_id
    inputs = {"model": model_id, "pairs": pairs.stage_run_id, "cfg": dpo_key(cfg), "seed": cfg.run.seed,
              "ref": ref_model_id}

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        version = stage_version(reg, pairs.stage_run_id, "train")  # the frozen training set, hash-checked on read
        rows = read_version(reg, version).to_pylist()
        training_pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        if not training_pairs:
            raise NoPairsError(f"iteration {iteration} produced no preference pairs (all prompts tied or unscored); "
                               "see the judge stage's parse failures and the pairs stage's dropped ties")
        ref_path = reg.model(ref_model_id)["path"] if ref_model_id != model_id else None  # None: TRL copies M_t
        job = TrainJob("dpo", reg.model(model_id)["path"], str(reg.model_dir(sid)), training_pairs, ref_path=ref_path)
        return job, {"ref_model_id": ref_model_id, "dataset_version": version,
                     "stats": {"pairs": len(training_pairs)}}

    return train_stage(cfg, "dpo", run_id, iteration, model_id, inputs, make_job)
