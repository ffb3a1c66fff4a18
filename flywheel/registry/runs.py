"""Runs and iterations: their ids and their rows in the registry.

A run's id is its name plus the hash of its config (less the registry's location, the monitors' thresholds and the
thread count), so the same command on the same config is the same run: running it again resumes it, and stages
already done are skipped.
"""

from __future__ import annotations

from ..config import FlywheelConfig, StepsConfig, content_hash
from .integrity import model_on_disk
from .store import Registry


NEW_AT_DEFAULT = (("sft", "mode"), ("sft", "cold_start_examples"), ("pairs", "mode"))
DEFAULTS = {("sft", "mode"): "full", ("sft", "cold_start_examples"): 16, ("pairs", "mode"): "outcome"}
DEFAULT_STEPS = StepsConfig().model_dump(mode="json")


def run_id_for(cfg: FlywheelConfig) -> str:
    data = cfg.model_dump(mode="json")
    data.pop("registry")
    data.pop("monitors", None)  # thresholds judge a run; they do not change it
    data["run"].pop("threads", None)  # how fast, not what
    data["train"].pop("report_to", None)  # where the figures are also sent, not what
    data.pop("ray", None)  # which cluster and how many workers: where, not what
    for section, key in NEW_AT_DEFAULT:  # settings added later change no earlier run's id while at their defaults
        if section in data and data[section].get(key, DEFAULTS[(section, key)]) == DEFAULTS[(section, key)]:
            data[section].pop(key, None)
    if data.get("steps") == DEFAULT_STEPS:
        data.pop("steps")
    return f"{cfg.run.name}-{content_hash(data, 8)}"


def start_run(reg: Registry, cfg: FlywheelConfig) -> str:
    """Record the run (again, when resumed) as running; its id."""
    run_id = run_id_for(cfg)
    reg.start_run(run_id, cfg.run.name, cfg.config_hash(), cfg.model_dump(mode="json"))
    return run_id


def finished_iteration(reg: Registry, run_id: str, iteration: int) -> dict | None:
    """{'model_id', 'prompts_sid'} of an iteration of this run that finished, else None. Resuming skips such an
    iteration whole, without a flow or task run per stage (each stage would find itself done anyway)."""
    model_out = reg.scalar("SELECT model_out FROM iterations WHERE run_id = ? AND iteration = ? AND status = 'done'",
                           [run_id, iteration])
    row = reg.model(model_out) if model_out is not None else None
    if row is None or not model_on_disk(row, reg.root):  # a model folder gone: its iteration runs (and trains) again
        return None
    prompts = reg.scalar("SELECT stage_run_id FROM run_stages WHERE run_id = ? AND iteration = ? "
                         "AND stage = 'self_instruct'", [run_id, iteration])
    return {"model_id": model_out, "prompts_sid": prompts}
