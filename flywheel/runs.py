"""Runs and iterations: their ids and their rows in the registry.

A run's id is its name plus the hash of its config (less the registry's location), so the same command on the same
config is the same run: running it again resumes it, and stages already done are skipped.
"""

from __future__ import annotations

from .config import FlywheelConfig, content_hash
from .registry import Registry


def run_id_for(cfg: FlywheelConfig) -> str:
    data = cfg.model_dump(mode="json")
    data.pop("registry")
    return f"{cfg.run.name}-{content_hash(data, 8)}"


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
