"""`flywheel run` (and `flywheel summary`, which prints the report of a config's run again)."""

from __future__ import annotations

import logging
import os
import time

from ..config import FlywheelConfig
from . import add_config_args, config_from, console


def run_flywheel(cfg: FlywheelConfig) -> int:
    """Check the inputs (`preflight`), then run (or resume) the flywheel of `cfg` through its Prefect flow
    (`flywheel.pipeline.run` inside), then print the report. The run takes the registry's lock first
    (`flywheel.registry.lock`) and holds it throughout: a second run on the same registry stops at once, naming this
    one, before its own checks."""
    from ..pipeline import preflight  # imports torch: here, so `flywheel --help` stays fast
    from ..registry import RegistryLockedError
    from ..registry.integrity import ModelIntegrityError, NonFiniteModelError
    from ..registry.lock import RegistryBusyError, registry_lock
    from ..registry.runs import run_id_for
    from ..training import NoTrainingDataError

    run_id = run_id_for(cfg)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "flywheel")  # batch commits in Prefect's logs and UI
    logging.getLogger("flywheel").setLevel(logging.INFO)
    try:
        with registry_lock(cfg.registry.root, run_id):  # before Prefect starts; the pipeline takes it again (re-entrant)
            preflight(cfg)
            from flows.api import local_api
            from flows.flywheel_flow import flywheel_flow

            console.print(f"[bold]flywheel[/] run [cyan]{run_id}[/]: {cfg.run.iterations} iteration(s), "
                          f"registry {cfg.registry.root}")
            t0 = time.perf_counter()
            with local_api():  # Prefect's API server, stopped with this process even when it is killed
                flywheel_flow(cfg)
    except RegistryBusyError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 1
    except (NoTrainingDataError, ModelIntegrityError, NonFiniteModelError) as e:  # each says what to change or restore
        console.print(f"[red]run {run_id} stopped:[/] {e}", highlight=False, soft_wrap=True)
        if isinstance(e, NoTrainingDataError):
            console.print("Finished stages are kept in the registry. Resuming with the same config stops here again: "
                          "change the config as above, and the stages whose inputs did not change are reused.",
                          soft_wrap=True)
        return 1
    except RegistryLockedError as e:
        console.print(f"[red]run {run_id} stopped:[/] {e}", highlight=False, soft_wrap=True)
        console.print("Finished stages are kept in the registry; run the same command again "
                      "(or `flywheel resume`) to resume.")
        return 1
    print_run(cfg, run_id, time.perf_counter() - t0)
    return 0


def print_run(cfg: FlywheelConfig, run_id: str, wall: float | None = None) -> None:
    """The run's report on the terminal (the figures of report.md), its models and where its files are."""
    from ..analysis import report
    from ..analysis.monitors import evaluate
    from ..registry import reader

    with reader(cfg.registry.root) as reg:
        rows = report.collect(reg, run_id)
        checks = evaluate(rows, report.monitors_config(reg, run_id))
        report_path = report.report_dir(reg, run_id) / "report.md"
        bootstrap = report.bootstrap_sentence(reg, run_id)
        status = report.status_sentence(reg, run_id)
        models = report.models_of(reg, run_id)
    report.print_report(run_id, rows, checks, console, bootstrap, status)
    for m in models:
        console.print(f"  {m['name']}: {m['path']}", soft_wrap=True)
    console.print(f"Registry: {cfg.registry.root / 'flywheel.duckdb'}", soft_wrap=True)
    console.print(f"Report:   {report_path} (plots beside it; `flywheel report --strict` exits 1 on a monitor warning)",
                  soft_wrap=True)
    if wall is not None:
        console.print(f"Wall time: {wall:.1f} s")


def _run(args) -> int:
    return run_flywheel(config_from(args))


def _summary(args) -> int:
    from ..registry import reader
    from ..registry.runs import run_id_for

    cfg = config_from(args)
    run_id = run_id_for(cfg)
    with reader(cfg.registry.root) as reg:
        known = reg.scalar("SELECT count(*) FROM runs WHERE run_id = ?", [run_id])
    if not known:
        console.print(f"no run {run_id} in {cfg.registry.root}")
        return 1
    print_run(cfg, run_id)
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run or resume a flywheel")
    add_config_args(p)
    p.set_defaults(func=_run)
    p = sub.add_parser("summary", help="print the report of a config's run again")
    add_config_args(p)
    p.set_defaults(func=_summary)
