"""Train: DPO (TRL) on the iteration's pair snapshot turns M_t into M_{t+1}, which is saved and registered."""

from __future__ import annotations

from .backends import release_backends
from .config import FlywheelConfig
from .models import load, resolve_device, save_atomically
from .pairs import read_snapshot
from .registry import Registry
from .stage import StageResult, run_stage
from .train import dpo_train


class NoPairsError(RuntimeError):
    pass


def train_dpo(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, pairs: StageResult) -> StageResult:
    """`pairs` is the pairs stage's result: its id and the hash of the snapshot it froze."""
    c = cfg.dpo
    device = resolve_device(cfg.run.device)
    inputs = {"model": model_id, "pairs": pairs.stage_run_id, "cfg": c.model_dump(), "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        rows = read_snapshot(reg, pairs.stage_run_id, pairs.stats["snapshot_hash"])
        training_pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        if not training_pairs:
            raise NoPairsError(f"iteration {iteration} produced no preference pairs (all prompts tied or unscored); "
                               "see the judge stage's parse failures and the pairs stage's dropped ties")
        release_backends()
        model, tokenizer = load(reg.model(model_id)["path"], device)
        metrics = dpo_train(model, tokenizer, training_pairs, beta=c.beta, lr=c.learning_rate, epochs=c.epochs,
                            batch_size=c.batch_size, max_length=c.max_length, device=device, seed=cfg.run.seed)
        save_atomically(model, tokenizer, reg.model_dir(sid))
        reg.register_model(model_id=sid, run_id=run_id, name=f"M{iteration + 1}", kind="dpo", iteration=iteration,
                           parent_id=model_id, path=str(reg.model_dir(sid)), stage_run_id=sid,
                           config_hash=cfg.config_hash(), metrics={**metrics, "pairs": len(training_pairs)})
        return {"model_id": sid, "path": str(reg.model_dir(sid)), "pairs": len(training_pairs), **metrics}

    return run_stage(cfg, "dpo", run_id, iteration, model_id, inputs, work)
