"""Schedules: the nightly flow (flows/nightly.py) as Prefect deployments on a Prefect server.

    register_schedule("0 2 * * *", "configs/demo.yaml", ["run.iterations=1"])   # create or update a deployment
    serve()                       # execute the schedules' runs as they come due (a Prefect Runner), until stopped
    schedule_lines()              # one description per schedule: state, cron, next run, last run, config
    act("pause", NAME)            # pause | resume | remove | run

`flywheel schedule` (flywheel/cli/schedule.py) is the command line over these. Every function needs a Prefect
server (`prefect server start`, and PREFECT_API_URL set): the temporary one Prefect starts by itself cannot schedule.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from flows.nightly import FLOW_NAME, nightly_flow
from flywheel.config import load_config
from flywheel.pipeline import preflight


def server_url() -> str:
    """The Prefect API URL; a clear error when none is set."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ValueError("schedules need a Prefect server: start one with `prefect server start` and set "
                         "PREFECT_API_URL=http://127.0.0.1:4200/api (Prefect's temporary local server cannot schedule)")
    return url


def deployments(client, names: list[str] | None = None) -> list:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowFilter, FlowFilterName

    found = client.read_deployments(
        flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])),
        deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)) if names else None)
    missing = sorted(set(names or []) - {d.name for d in found})
    if missing:
        known = ", ".join(d.name for d in client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME])))) or "none"
        raise ValueError(f"no schedule named {', '.join(missing)} on {server_url()} (schedules there: {known})")
    return sorted(found, key=lambda d: d.name)


def register_schedule(cron: str, config: str | None, overrides: list[str], name: str | None = None,
                      timezone: str = "UTC", workdir: str | Path | None = None):
    """Validate the config, then create (or update) the deployment; returns (name, deployment id)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

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


def serve(names: list[str] | None = None, say: Callable[[str], None] = print) -> None:
    """Execute the schedules' runs as they come due, until stopped (Ctrl-C / SIGTERM). Stopping does not pause
    the schedules: runs due while nothing serves wait, and run when a serve process starts again."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.runner import Runner

    with get_client(sync_client=True) as client:
        found = deployments(client, names)
    if not found:
        raise ValueError(f"no schedules on {server_url()} to serve; register one with flywheel schedule --cron ...")
    runner = Runner(name="flywheel-schedules", pause_on_shutdown=False)
    for d in found:  # re-registered as they are on the server: parameters, schedules, paused or not
        schedules = [DeploymentScheduleCreate(schedule=s.schedule, active=s.active, parameters=s.parameters,
                                              slug=s.slug) for s in d.schedules]
        runner.add_flow(nightly_flow, name=d.name, parameters=d.parameters, tags=d.tags, schedules=schedules,
                        paused=d.paused, description=d.description, entrypoint_type=EntrypointType.MODULE_PATH)
    say(f"serving {', '.join(d.name for d in found)} from {server_url()}; Ctrl-C to stop. "
        "Restart it after registering a new schedule.")
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        say("stopped; the schedules stay active, and their runs wait for the next serve process")


def schedule_lines() -> list[str]:
    """One entry per schedule: name, state, cron, next run, last run, then its config (plain lines: easy to grep)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return _lines(client)


def _lines(client) -> list[str]:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    found = deployments(client)
    lines = [f"{len(found)} flywheel schedule(s) on {server_url()}"]
    for d in found:
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
        lines.append(f"{d.name}  {'paused' if d.paused else 'active'}  {crons}  next: {nxt}  last: {prev}\n"
                     f"    {config}")
    return lines



def act(action: str, name: str) -> str:
    """pause, resume, remove or run (now, once: a serve process executes it) the schedule `name`; what was done."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        d = deployments(client, [name])[0]
        if action == "pause":
            client.pause_deployment(d.id)
        elif action == "resume":
            client.resume_deployment(d.id)
        elif action == "remove":
            client.delete_deployment(d.id)
    if action == "run":
        from prefect.deployments import run_deployment

        flow_run = run_deployment(f"{FLOW_NAME}/{d.name}", timeout=0, as_subflow=False)
        return (f"started flow run {flow_run.name} ({flow_run.id}) of {d.name}; a `flywheel schedule serve` process "
                "executes it")
    return f"{d.name}: {'paused' if action == 'pause' else 'resumed' if action == 'resume' else 'removed'}"
