"""`flywheel` command line.

    flywheel run --config configs/demo.yaml [key=value ...]    run (or resume) a flywheel: seeds -> M1 -> M2 -> ...
    flywheel summary --config configs/demo.yaml [key=value ...] print the per-iteration summary of that run

A bad config, seed file or template is reported in one message (exit 2) before anything runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from rich.console import Console

from .config import ConfigError, FlywheelConfig, load_config

console = Console()


def preflight(cfg: FlywheelConfig) -> None:
    """Fail before the run starts on inputs that are missing or malformed."""
    from .seeds import load_seeds

    load_seeds(cfg.seeds.path)
    for name, path in (("judge.template", cfg.judge.template), ("self_instruct.template", cfg.self_instruct.template)):
        if not path.is_file():
            raise ConfigError(f"{name}: template file not found: {path}")


def _run(cfg: FlywheelConfig) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "flywheel")  # batch commits in Prefect's logs and UI
    logging.getLogger("flywheel").setLevel(logging.INFO)
    from flows.flywheel_flow import flywheel_flow  # imports prefect: after the environment is set

    from . import summary
    from .dpo import NoPairsError
    from .registry import Registry, RegistryLockedError
    from .runs import run_id_for

    run_id = run_id_for(cfg)
    console.print(f"[bold]flywheel[/] run [cyan]{run_id}[/]: {cfg.run.iterations} iteration(s), "
                  f"registry {cfg.registry.root}")
    t0 = time.perf_counter()
    try:
        flywheel_flow(cfg)
    except (NoPairsError, RegistryLockedError) as e:
        console.print(f"[red]run {run_id} stopped:[/] {e}")
        console.print("Finished stages are kept in the registry; run the same command again to resume.")
        return 1
    wall = time.perf_counter() - t0
    with Registry(cfg.registry.root) as reg:
        iterations, path = summary.write(reg, run_id)
    summary.print_table(run_id, iterations, console)
    for it in iterations:
        if it["model"]:
            console.print(f"  {it['model']['name']}: {it['model']['path']}", soft_wrap=True)
    console.print(f"Registry: {cfg.registry.root / 'flywheel.duckdb'}", soft_wrap=True)
    console.print(f"Summary:  {path}", soft_wrap=True)
    console.print(f"Wall time: {wall:.1f} s")
    return 0


def _summary(cfg: FlywheelConfig) -> int:
    from . import summary
    from .registry import Registry
    from .runs import run_id_for

    run_id = run_id_for(cfg)
    with Registry(cfg.registry.root) as reg:
        iterations = summary.collect(reg, run_id)
    if not iterations:
        console.print(f"no run {run_id} in {cfg.registry.root}")
        return 1
    summary.print_table(run_id, iterations, console)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel", description="Self-rewarding LLM post-training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run or resume a flywheel"), ("summary", "print a run's per-iteration summary")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. generate.n=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "run":
            preflight(cfg)
    except (ConfigError, ValueError) as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        return 2
    return _run(cfg) if args.command == "run" else _summary(cfg)


if __name__ == "__main__":
    sys.exit(main())
