"""`flywheel run` and `flywheel summary`."""

from __future__ import annotations

import logging
import os
import time

from ..config import ConfigError, FlywheelConfig
from . import add_config_args, config_from, console


def preflight(cfg: FlywheelConfig) -> None:
    """Fail before the run starts on inputs that are missing or malformed."""
    from ..backends import check_backend
    from ..bases import resolve_base
    from ..judge import check_judge
    from ..seeds import load_seed_data

    resolve_base(cfg.model.base)  # a missing package or file, or a GGUF this install cannot read: named here
    load_seed_data(cfg.seeds.path, cfg.seeds.format)
    check_backend(cfg.generate)
    check_judge(cfg)
    if cfg.model.base == "tiny" and cfg.model.tiny.corpus:
        from ..bootstrap import read_corpus

        read_corpus(cfg.model.tiny.corpus)
    if cfg.self_instruct.prompts_file:
        from ..self_instruct import read_prompts_file

        read_prompts_file(cfg.self_instruct.prompts_file)
    for name, path in (("judge.template", cfg.judge.template), ("self_instruct.template", cfg.self_instruct.template)):
        if not path.is_file():
            raise ConfigError(f"{name}: template file not found: {path}")


def run_flywheel(cfg: FlywheelConfig) -> int:
    """Run (or resume) the flywheel of `cfg` through Prefect, then write its summary and report and print the report. The run holds the
    registry's lock throughout (`flywheel.lock`): a second run on the same registry stops at once, naming this one."""
    from contextlib import ExitStack

    from ..lock import RegistryBusyError, registry_lock
    from ..runs import run_id_for

    run_id = run_id_for(cfg)
    with ExitStack() as held:
        try:
            held.enter_context(registry_lock(cfg.registry.root, run_id))
        except RegistryBusyError as e:
            console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            return 1
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # busy 2-core machines
        os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "flywheel")  # batch commits in Prefect's logs and UI
        logging.getLogger("flywheel").setLevel(logging.INFO)
        from flows.flywheel_flow import flywheel_flow  # imports prefect: after the environment is set

        from .. import report, summary
        from ..dpo import NoPairsError
        from ..monitors import evaluate
        from ..registry import Registry, RegistryLockedError

        console.print(f"[bold]flywheel[/] run [cyan]{run_id}[/]: {cfg.run.iterations} iteration(s), "
                      f"registry {cfg.registry.root}")
        t0 = time.perf_counter()
        try:
            flywheel_flow(cfg)
        except (NoPairsError, RegistryLockedError) as e:
            console.print(f"[red]run {run_id} stopped:[/] {e}")
            console.print("Finished stages are kept in the registry; run the same command again "
                          "(or `flywheel resume`) to resume.")
            return 1
        wall = time.perf_counter() - t0
        with Registry(cfg.registry.root) as reg:
            iterations, path = summary.write(reg, run_id)
            report_rows = report.collect(reg, run_id)  # the flow wrote the report's files; print the same figures
            checks = evaluate(report_rows, report.monitors_config(reg, run_id))
            report_path = report.report_dir(reg, run_id) / "report.md"
            bootstrap = report.bootstrap_sentence(reg, run_id)
    report.print_report(run_id, report_rows, checks, console, bootstrap)
    for it in iterations:
        if it["model"]:
            console.print(f"  {it['model']['name']}: {it['model']['path']}", soft_wrap=True)
    console.print(f"Registry: {cfg.registry.root / 'flywheel.duckdb'}", soft_wrap=True)
    console.print(f"Summary:  {path}", soft_wrap=True)
    console.print(f"Report:   {report_path} (plots beside it; `flywheel report --strict` exits 1 on a monitor warning)",
                  soft_wrap=True)
    console.print(f"Wall time: {wall:.1f} s")
    return 0


def _run(args) -> int:
    cfg = config_from(args)
    preflight(cfg)
    return run_flywheel(cfg)


def _summary(args) -> int:
    from .. import summary
    from ..registry import Registry
    from ..runs import run_id_for

    cfg = config_from(args)
    run_id = run_id_for(cfg)
    with Registry(cfg.registry.root) as reg:
        iterations = summary.collect(reg, run_id)
    if not iterations:
        console.print(f"no run {run_id} in {cfg.registry.root}")
        return 1
    summary.print_table(run_id, iterations, console)
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="run or resume a flywheel")
    add_config_args(p)
    p.set_defaults(func=_run)
    p = sub.add_parser("summary", help="print a run's per-iteration summary")
    add_config_args(p)
    p.set_defaults(func=_summary)
