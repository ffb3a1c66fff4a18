"""`flywheel resume`: run a stopped run again, from the config stored in the registry.

    flywheel resume                         the most recent run in data_registry that is not done
    flywheel resume e2e-1a2b3c4d --registry runs/reg
    flywheel resume --list                  the registry's runs, their status and where each stopped

The config comes from the registry's `runs` table, so neither the YAML nor the overrides are needed. The run goes
through `run_flywheel`, like `flywheel run`: stages whose ledger row says done are skipped without loading a model, and
the stage that failed or was killed continues from its last committed batch. Running the same `flywheel run` command
again does exactly the same. Relative paths in the stored config (seeds, templates) are read from the current
directory, as they were when the run started.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from ..config import ConfigError, FlywheelConfig, RegistryConfig
from . import add_registry_arg, console


def runs_in(reg) -> list[dict]:
    """Every run, newest first, with the first stage of it that is not done (None when all are)."""
    runs = reg.rows("SELECT run_id, status, created_at, finished_at FROM runs ORDER BY created_at DESC")
    for run in runs:
        stopped = reg.rows(
            "SELECT rs.iteration, rs.stage, s.status, s.error "
            "FROM run_stages rs JOIN stage_runs s USING (stage_run_id) "
            "WHERE rs.run_id = ? AND s.status != 'done' ORDER BY s.started_at LIMIT 1", [run["run_id"]])
        run["stopped_at"] = stopped[0] if stopped else None
    return runs


def pick_run(reg, run_id: str | None) -> dict | None:
    """The run named (ValueError, a clean CLI error, if there is none), or the most recent one that is not done
    (None when every run is done)."""
    runs = runs_in(reg)
    if run_id is not None:
        for run in runs:
            if run["run_id"] == run_id:
                return run
        known = ", ".join(r["run_id"] for r in runs[:10]) or "none"
        raise ValueError(f"no run {run_id!r} in the registry {reg.root} (runs there, newest first: {known})")
    return next((run for run in runs if run["status"] != "done"), None)


def stored_config(reg, run_id: str, root: Path) -> FlywheelConfig:
    """The config run `run_id` was started with, pointed at the registry `root` (which may have moved)."""
    raw = reg.scalar("SELECT config FROM runs WHERE run_id = ?", [run_id])
    try:
        cfg = FlywheelConfig.model_validate(json.loads(raw))
    except (ValidationError, ValueError) as e:
        raise ConfigError(f"run {run_id}: the config stored in {reg.path} is not valid for this version of "
                          f"flywheel:\n{e}") from None
    return cfg.model_copy(update={"registry": RegistryConfig(root=root)})


def _describe(run: dict) -> str:
    s = run["stopped_at"]
    if s is None:
        return run["status"]
    error = (s["error"] or "").strip().splitlines()
    where = f"{run['status']}, stopped in {s['stage']} (iteration {s['iteration']}, {s['status']})"
    return f"{where}: {error[0]}" if error else where


def _list(root: Path) -> int:
    from rich.table import Table

    from ..registry import reader

    with reader(root) as reg:
        runs = runs_in(reg)
    table = Table(title=f"runs in {root}")
    for col in ("run", "started", "status"):
        table.add_column(col)
    for run in runs:
        table.add_row(run["run_id"], f"{run['created_at']:%Y-%m-%d %H:%M}", _describe(run))
    console.print(table)
    return 0


def _resume(args) -> int:
    from ..registry import Registry
    from ..registry.lock import RegistryBusyError, registry_lock
    from ..registry.runs import run_id_for
    from .run import run_flywheel

    root: Path = args.registry
    if not (root / "flywheel.duckdb").is_file():
        raise ValueError(f"no registry at {root} (no flywheel.duckdb there); pass --registry DIR")
    if args.list:
        return _list(root)
    try:  # held while choosing, so no run starts between the choice and the run (run_flywheel takes it again)
        with registry_lock(root, args.run_id or "resume"):
            with Registry(root) as reg:
                run = pick_run(reg, args.run_id)
                if run is None:
                    console.print(f"every run in {root} is done; nothing to resume (name a run to run it again; "
                                  "`flywheel resume --list` lists them)", highlight=False, soft_wrap=True)
                    return 0
                cfg = stored_config(reg, run["run_id"], root)
            console.print(f"resuming [cyan]{run['run_id']}[/] ({_describe(run)})", highlight=False, soft_wrap=True)
            if run_id_for(cfg) != run["run_id"]:
                console.print(f"[yellow]note:[/] this flywheel's config has fields the stored one lacked, so the run "
                              f"id is now {run_id_for(cfg)}; finished stages are still reused (stage keys are "
                              "content hashes)", soft_wrap=True)
            return run_flywheel(cfg)  # checks the inputs (preflight) too
    except RegistryBusyError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 1


def register(sub) -> None:
    p = sub.add_parser("resume", help="resume a stopped run from the config stored in the registry")
    p.add_argument("run_id", nargs="?", default=None, metavar="RUN_ID",
                   help="the run to resume (default: the most recent run that is not done)")
    add_registry_arg(p)
    p.add_argument("--list", action="store_true", help="list the registry's runs and where each stopped")
    p.set_defaults(func=_resume)
