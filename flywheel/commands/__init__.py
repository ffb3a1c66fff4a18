"""One module per `flywheel` subcommand. Each has `register(sub)`, which adds its parser and sets `func(args) -> int`.

Keep imports of heavy libraries (torch, transformers, prefect) inside `func`, so `flywheel --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from ..config import FlywheelConfig, load_config

console = Console()

# Modules in the order `flywheel --help` lists them.
COMMANDS = ["run", "resume", "report", "datasets", "lineage", "schedule", "serve", "eval", "experiment"]


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. generate.n=8")


def config_from(args: argparse.Namespace) -> FlywheelConfig:
    """The config named by --config and overrides; raises ConfigError (the CLI prints it and exits 2)."""
    return load_config(args.config, args.overrides)


def add_registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--registry", type=Path, default=Path("data_registry"),
                   help="registry root (default: data_registry)")
