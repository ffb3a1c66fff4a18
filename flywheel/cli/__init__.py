"""`flywheel` command line. Each subcommand lives in `flywheel/cli/<name>.py`, with `register(sub)`, which adds
its parser and sets `func(args) -> int`. Heavy imports (torch, transformers, prefect) stay inside `func`, so
`flywheel --help` stays fast.

    flywheel run --config configs/demo.yaml [key=value ...]     run (or resume) a flywheel: seeds -> M1 -> M2 -> ...
    flywheel summary --config configs/demo.yaml [key=value ...]  print that run's report again
    flywheel <command> --help                                    every other command

A bad config, seed file or template is reported in one message (exit 2) before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from ..config import ConfigError, FlywheelConfig, load_config

console = Console()

# Modules in the order `flywheel --help` lists them.
COMMANDS = ["run", "resume", "report", "datasets", "verify", "lineage", "schedule", "serve", "eval", "experiment", "browse"]


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. generate.n=8")


def config_from(args: argparse.Namespace) -> FlywheelConfig:
    """The config named by --config and overrides; raises ConfigError (the CLI prints it and exits 2)."""
    return load_config(args.config, args.overrides)


def add_registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, default=Path("data_registry"),
                   help="registry root (default: data_registry)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description="Self-rewarding LLM post-training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"flywheel.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Prefect's temporary local API migrates its SQLite on first start: give it time on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    from ..registry.store import RegistryDamagedError, RegistryLockedError, RegistrySchemaError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:  # config, seed and template errors: a message, not a traceback
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except (RegistryLockedError, RegistrySchemaError, RegistryDamagedError) as e:  # each names its remedy
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
