"""Runs and iterations: their ids and their rows in the registry.

A run's id is its name plus the hash of its config (less the registry's location and the monitors' thresholds), so the same command on the same
config is the same run: running it again resumes it, and stages already done are skipped.
"""

from __future__ import annotations

from .config import FlywheelConfig, content_hash
from .registry import Registry


def run_id_for(cfg: FlywheelConfig) -> str:
    data = cfg.model_dump(mode="json")
    data.pop("registry")
    data.pop("monitors", None)  # thresholds judge a run; they do not change it
    data["run"].pop("threads", None)  # how fast, not what
    return f"{cfg.run.name}-{content_hash(data, 8)}"


def status(cfg: FlywheelConfig, run_id: str) -> str | None:
    """The run's status in the registry ('running', 'done', 'failed'), or None when it has never started."""
    with Registry(cfg.registry.root) as reg:
        return reg.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id])


def start_run(cfg: FlywheelConfig) -> str:
    run_id = run_id_for(cfg)
    with Registry(cfg.registry.root) as reg:
        reg.start_run(run_id, cfg.run.name, cfg.config_hash(), cfg.model_dump(mode="json"))
    return run_id


def finish_run(cfg: FlywheelConfig, run_id: str, status: str) -> None:
    with Registry(cfg.registry.root) as reg:
        reg.finish_run(run_id, status)


def start_iteration(cfg: FlywheelConfig, run_id: str, iteration: int, model_in: str) -> None:
    with Registry(cfg.registry.root) as reg:
        reg.start_iteration(run_id, iteration, model_in)


def finish_iteration(cfg: FlywheelConfig, run_id: str, iteration: int, model_out: str) -> None:
    with Registry(cfg.registry.root) as reg:
        reg.finish_iteration(run_id, iteration, model_out)


def finished_iteration(cfg: FlywheelConfig, run_id: str, iteration: int) -> dict | None:
    """{'model_id', 'prompts_sid'} of an iteration of this run that finished, else None. Resuming skips such an
    iteration whole, without a flow or task run per stage (each stage would find itself done anyway)."""
    with Registry(cfg.registry.root) as reg:
        model_out = reg.scalar("SELECT model_out FROM iterations WHERE run_id = ? AND iteration = ? AND status = 'done'",
                               [run_id, iteration])
        if model_out is None or reg.model(model_out) is None:
            return None
        prompts = reg.scalar("SELECT stage_run_id FROM run_stages WHERE run_id = ? AND iteration = ? "
                             "AND stage = 'self_instruct'", [run_id, iteration])
    return {"model_id": model_out, "prompts_sid": prompts}
