"""Unattended runs: which iteration a nightly run does next, and which failures are worth retrying.

    plan = next_iteration(cfg)        # cfg as the schedule was registered with; run.iterations is ignored
    run_flywheel(plan.cfg)            # plan.cfg.run.iterations = plan.finished + 1

A schedule names a config. Every night the flywheel should take the registry's latest model of that config one
iteration further. Runs of "the same config" are the runs whose stored config equals it in everything but
`run.iterations` and the registry's location; `finished` is the most iterations one of them completed (1..k all
done). Stage keys are content hashes, so running `run.iterations = finished + 1` skips iterations 1..k without loading
a model and computes only iteration k+1. A night that fails part-way leaves `finished` where it was, so the next night
(or a retry) resumes the same run from its last committed batch.

`is_transient` is the retry policy for unattended runs (Prefect's task `retry_condition_fn` calls it): retry what a
wait can fix, never what would fail the same way again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError

from .config import FlywheelConfig, content_hash
from .registry import Registry, RegistryLockedError
from .registry.lock import RegistryBusyError
from .registry.runs import run_id_for


def family_hash(config: dict) -> str:
    """The hash of a config (as `model_dump(mode="json")`) less `run.iterations` and the registry's location."""
    data = {k: v for k, v in config.items() if k != "registry"}
    data["run"] = {k: v for k, v in data.get("run", {}).items() if k != "iterations"}
    return content_hash(data)


@dataclass
class NextIteration:
    cfg: FlywheelConfig             # the config to run: run.iterations = finished + 1
    finished: int                   # iterations 1..finished are done in some run of this config
    latest_model: str | None        # M_{finished+1}, what that iteration starts from; None if none finished yet
    from_run: str | None            # the run that finished them

    @property
    def run_id(self) -> str:
        return run_id_for(self.cfg)


def finished_iterations(reg: Registry, cfg: FlywheelConfig) -> tuple[int, str | None, str | None]:
    """(iterations finished, the last one's output model, its run) over the registry's runs of `cfg`'s family."""
    family = family_hash(cfg.model_dump(mode="json"))
    best: tuple[int, str | None, str | None] = (0, None, None)
    for run in reg.rows("SELECT run_id, config FROM runs ORDER BY created_at"):
        try:  # stored configs are re-validated so fields added since then take their defaults
            stored = FlywheelConfig.model_validate(json.loads(run["config"])).model_dump(mode="json")
        except (ValidationError, ValueError):
            continue  # written by a flywheel whose config this one no longer reads: not this family
        if family_hash(stored) != family:
            continue
        done = reg.rows("SELECT iteration, model_out FROM iterations WHERE run_id = ? AND status = 'done' "
                        "ORDER BY iteration", [run["run_id"]])
        count, model = 0, None
        for row in done:
            if row["iteration"] != count + 1:
                break
            count, model = count + 1, row["model_out"]
        if count > best[0]:
            best = (count, model, run["run_id"])
    return best


def next_iteration(cfg: FlywheelConfig) -> NextIteration:
    """The config of the next iteration of `cfg`'s family in its registry (read while the caller holds the lock)."""
    root = cfg.registry.root
    if (root / "flywheel.duckdb").exists():
        with Registry(root) as reg:
            finished, model, run_id = finished_iterations(reg, cfg)
    else:
        finished, model, run_id = 0, None, None
    nxt = cfg.model_copy(update={"run": cfg.run.model_copy(update={"iterations": finished + 1})})
    return NextIteration(nxt, finished, model, run_id)


def is_transient(exc: BaseException | None) -> bool:
    """Worth retrying after a wait: the registry's DuckDB file briefly held by a reader in another process
    (`flywheel report`, a notebook), or a connection that dropped. Not worth it: another run holding the registry
    (it may take hours; the flow-level retry or the next night handles it), bad config or data, no pairs, a model
    that does not fit: those fail the same way again."""
    if isinstance(exc, RegistryBusyError):
        return False
    return isinstance(exc, (RegistryLockedError, ConnectionError, TimeoutError))
