"""`flywheel schedule`: nightly iterations through a Prefect server (see docs/schedules.md).

    flywheel schedule --cron "0 2 * * *" --config configs/demo.yaml [key=value ...] [--name NAME] [--timezone UTC]
    flywheel schedule list                      the schedules, their next run and their last one
    flywheel schedule pause NAME | resume NAME | remove NAME
    flywheel schedule run NAME                  one run now (a serve process executes it)
    flywheel schedule serve [NAME ...]          execute the schedules' runs as they come due; keep it running

Registering makes a Prefect deployment of `flows/nightly.py` (named `flywheel-nightly/NAME`, default NAME
`<run.name>-nightly`) with the config's path, the overrides and the current directory as its parameters, and the cron
schedule; the Prefect server creates its runs. Each run takes the config's latest model one iteration further (see
`flywheel.schedule`). No work pool is needed: `flywheel schedule serve` is the process that executes the runs, each in
a subprocess. Every subcommand needs a Prefect server (`prefect server start`, and PREFECT_API_URL set): the temporary
one Prefect starts by itself cannot schedule.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import console

ACTIONS = ("list", "pause", "resume", "remove", "run", "serve")
USAGE = ('flywheel schedule needs --cron to register a schedule (flywheel schedule --cron "0 2 * * *" --config X '
         "key=value ...), or one of: list, pause NAME, resume NAME, remove NAME, run NAME, serve NAME ...")


def _server() -> str:
    """The Prefect API URL; a clear error when none is set."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ValueError("schedules need a Prefect server: start one with `prefect server start` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api (Prefect's temporary local server cannot schedule)")
    return url


def _deployments(client, names: list[str] | None = None) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName

    from flows.nightly import FLOW_NAME

    found = client.read_deployments(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)) if names else None)
    missing = sorted(set(names or []) - {d.name for d in found})
    if missing:
        known = ", ".join(d.name for d in client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))) or "none"
        raise ValueError(f"no schedule named {', '.join(missing)} on {_server()} (schedules there: {known})")
    return sorted(found, key=lambda d: d.name)


def register_schedule(cron: str, config: str | None, overrides: list[str], name: str | None = None,
                      timezone: str = "UTC", workdir: str | Path | None = None):
    """Validate the config, then create (or update) the deployment; returns (name, deployment id)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.nightly import nightly_flow

    from ..config import load_config
    from .run import preflight

    cfg = load_config(config, overrides)  # a bad config fails now, not at 2 a.m.
    preflight(cfg)
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"--timezone: unknown time zone {timezone!r} (an IANA name such as UTC or Europe/Paris)")
    try:
        schedule = Cron(cron, timezone=timezone)
    except ValueError as e:
        raise ValueError(f"--cron: {cron!r} is not a valid cron expression ({e})") from None
    name = name or f"{cfg.run.name}-nightly"
    params = {"config": str(Path(config).resolve()) if config else None, "overrides": list(overrides),
              "workdir": str(Path(workdir or os.getcwd()).resolve())}
    deployment = nightly_flow.to_deployment(
        name, schedule=schedule, parameters=params, entrypoint_type=EntrypointType.MODULE_PATH, tags=["flywheel"],
        description=f"One more flywheel iteration of {config or 'the default config'} {' '.join(overrides)}".strip())
    return name, deployment.apply()


def serve(names: list[str] | None = None) -> None:
    """Execute the schedules' runs as they come due, until stopped (Ctrl-C / SIGTERM). Stopping does not pause
    the schedules: runs due while nothing serves wait, and run when a serve process starts again."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.runner import Runner

    from flows.nightly import nightly_flow

    with get_client(sync_client=True) as client:
        deployments = _deployments(client, names)
    if not deployments:
        raise ValueError(f"no schedules on {_server()} to serve; register one with flywheel schedule --cron ...")
    runner = Runner(name="flywheel-schedules", pause_on_shutdown=False)
    for d in deployments:  # re-registered as they are on the server: parameters, schedules, paused or not
        schedules = [DeploymentScheduleCreate(schedule=s.schedule, active=s.active, parameters=s.parameters,
                                              slug=s.slug) for s in d.schedules]
        runner.add_flow(nightly_flow, name=d.name, parameters=d.parameters, tags=d.tags, schedules=schedules,
                        paused=d.paused, description=d.description, entrypoint_type=EntrypointType.MODULE_PATH)
    console.print(f"serving {', '.join(d.name for d in deployments)} from {_server()}; Ctrl-C to stop. "
                  "Restart it after registering a new schedule.", soft_wrap=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        console.print("stopped; the schedules stay active, and their runs wait for the next serve process")


def _list(client) -> int:
    """One line per schedule: name, state, cron, next run, last run, config (plain lines: easy to grep)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    deployments = _deployments(client)
    console.print(f"{len(deployments)} flywheel schedule(s) on {_server()}", highlight=False)
    for d in deployments:
        only = DeploymentFilter(id=DeploymentFilterId(any_=[d.id]))
        scheduled = FlowRunFilterStateType(any_=[StateType.SCHEDULED])
        upcoming = client.read_flow_runs(deployment_filter=only, sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=1,
                                         flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=scheduled)))
        past = FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])
        last = client.read_flow_runs(deployment_filter=only, sort=FlowRunSort.START_TIME_DESC, limit=1,
                                     flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=past)))
        crons = ", ".join(f"{s.schedule.cron} {s.schedule.timezone or 'UTC'}" + ("" if s.active else " (inactive)")
                          for s in d.schedules if getattr(s.schedule, "cron", None)) or "no cron"
        nxt = f"{upcoming[0].expected_start_time:%Y-%m-%d %H:%M %Z}" if upcoming else "-"
        prev = (f"{last[0].state_name} {last[0].start_time:%Y-%m-%d %H:%M}" if last and last[0].start_time
                else last[0].state_name if last else "-")
        params = d.parameters
        config = " ".join([params.get("config") or "(defaults)", *params.get("overrides", [])])
        console.print(f"{d.name}  {'paused' if d.paused else 'active'}  {crons}  next: {nxt}  last: {prev}\n"
                      f"    {config}", highlight=False, soft_wrap=True, markup=False)
    return 0


def _schedule(args) -> int:
    words: list[str] = args.words
    if args.cron is not None:
        bad = [w for w in words if "=" not in w]
        if bad:
            raise ValueError(f"with --cron, positional arguments are config overrides (key=value); got {bad[0]!r}")
        _server()
        name, dep_id = register_schedule(args.cron, args.config, words, args.name, args.timezone)
        console.print(f"registered [cyan]flywheel-nightly/{name}[/] ({dep_id}): {args.cron} {args.timezone}. "
                      "Runs execute in a `flywheel schedule serve` process.", soft_wrap=True)
        return 0
    if not words or words[0] not in ACTIONS:
        raise ValueError(USAGE)
    action, names = words[0], words[1:]
    if action in ("pause", "resume", "remove", "run") and len(names) != 1:
        raise ValueError(f"flywheel schedule {action} takes one schedule name (see `flywheel schedule list`)")
    _server()
    if action == "serve":
        serve(names or None)
        return 0
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        if action == "list":
            return _list(client)
        d = _deployments(client, names)[0]
        if action == "pause":
            client.pause_deployment(d.id)
        elif action == "resume":
            client.resume_deployment(d.id)
        elif action == "remove":
            client.delete_deployment(d.id)
    if action == "run":
        from prefect.deployments import run_deployment

        from flows.nightly import FLOW_NAME

        flow_run = run_deployment(f"{FLOW_NAME}/{d.name}", timeout=0, as_subflow=False)
        console.print(f"started flow run {flow_run.name} ({flow_run.id}) of {d.name}; a `flywheel schedule serve` "
                      "process executes it", soft_wrap=True)
        return 0
    console.print(f"{d.name}: {'paused' if action == 'pause' else 'resumed' if action == 'resume' else 'removed'}")
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
