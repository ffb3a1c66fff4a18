"""`flywheel schedule`: nightly iterations through a Prefect server (see docs/schedules.md).

    flywheel schedule --cron "0 2 * * *" --config configs/demo.yaml [key=value ...] [--name NAME] [--timezone UTC]
    flywheel schedule list                      the schedules, their next run and their last one
    flywheel schedule pause NAME | resume NAME | remove NAME
    flywheel schedule run NAME                  one run now (a serve process executes it)
    flywheel schedule serve [NAME ...]          execute the schedules' runs as they come due; keep it running

Registering makes a Prefect deployment (flows/schedule.py) of `flows/nightly.py` (named `flywheel-nightly/NAME`, default NAME
`<run.name>-nightly`) with the config's path, the overrides and the current directory as its parameters, and the cron
schedule; the Prefect server creates its runs. Each run takes the config's latest model one iteration further (see
`flywheel.schedule`). No work pool is needed: `flywheel schedule serve` is the process that executes the runs, each in
a subprocess. Every subcommand needs a Prefect server (`prefect server start`, and PREFECT_API_URL set): the temporary
one Prefect starts by itself cannot schedule.
"""

from __future__ import annotations

from . import console

ACTIONS = ("list", "pause", "resume", "remove", "run", "serve")
USAGE = ('flywheel schedule needs --cron to register a schedule (flywheel schedule --cron "0 2 * * *" --config X '
         "key=value ...), or one of: list, pause NAME, resume NAME, remove NAME, run NAME, serve NAME ...")


def _schedule(args) -> int:
    from flows import schedule  # Prefect lives under flows/

    words: list[str] = args.words
    if args.cron is not None:
        bad = [w for w in words if "=" not in w]
        if bad:
            raise ValueError(f"with --cron, positional arguments are config overrides (key=value); got {bad[0]!r}")
        schedule.server_url()
        name, dep_id = schedule.register_schedule(args.cron, args.config, words, args.name, args.timezone)
        console.print(f"registered [cyan]flywheel-nightly/{name}[/] ({dep_id}): {args.cron} {args.timezone}. "
                      "Runs execute in a `flywheel schedule serve` process.", soft_wrap=True)
        return 0
    if not words or words[0] not in ACTIONS:
        raise ValueError(USAGE)
    action, names = words[0], words[1:]
    if action in ("pause", "resume", "remove", "run") and len(names) != 1:
        raise ValueError(f"flywheel schedule {action} takes one schedule name (see `flywheel schedule list`)")
    schedule.server_url()
    if action == "serve":
        schedule.serve(names or None, say=lambda text: console.print(text, soft_wrap=True))
    elif action == "list":
        for line in schedule.schedule_lines():
            console.print(line, highlight=False, soft_wrap=True, markup=False)
    else:
        console.print(schedule.act(action, names[0]), highlight=False, soft_wrap=True)
    return 0


def register(sub) -> None:
    import argparse

    p = sub.add_parser("schedule", help="nightly iterations through a Prefect server (register, list, serve, ...)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="*", metavar="ACTION|key=value",
                   help=f"with --cron: config overrides; otherwise one of {', '.join(ACTIONS)} and a schedule name")
    p.add_argument("--cron", default=None, help='when to run, e.g. "0 2 * * *" (02:00 every day)')
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--name", default=None, help="schedule name (default: <run.name>-nightly)")
    p.add_argument("--timezone", default="UTC", help="time zone of the cron expression (default: UTC)")
    p.set_defaults(func=_schedule)
