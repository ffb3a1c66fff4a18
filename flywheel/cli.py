"""`flywheel` command line. Each subcommand lives in `flywheel/commands/<name>.py`.

    flywheel run --config configs/demo.yaml [key=value ...]     run (or resume) a flywheel: seeds -> M1 -> M2 -> ...
    flywheel summary --config configs/demo.yaml [key=value ...]  print the per-iteration summary of that run
    flywheel <command> --help                                    every other command

A bad config, seed file or template is reported in one message (exit 2) before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rich.markup import escape

from .commands import COMMANDS, console
from .config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flywheel", description="Self-rewarding LLM post-training.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"flywheel.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"flywheel.commands.{name}":
                raise
            continue  # not written yet
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Prefect's temporary local API migrates its SQLite on first start: give it time on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError) as e:  # config, seed and template errors: a message, not a traceback
        console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
