"""Nightly schedules against a real Prefect server: cron runs at the right times, and a run adds the next iteration.

A real `prefect server start` runs on a free port on 127.0.0.1 (its own PREFECT_HOME); while it boots, the registry
gets one finished iteration of a tiny config (the stages of test_kill_resume, no Prefect). `flywheel schedule --cron
"0 2 * * *"` registers that config; the server's scheduler must create runs at 02:00 UTC on consecutive days. Then a
real `flywheel schedule serve` process executes a run started now (`flywheel schedule run`): it must decide that one
iteration is finished, run the second one only, and leave one more model (M3) in the registry. The server and the
serve process are stopped at the end.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from flywheel import pipeline
from flywheel.cli import main as cli_main
from flywheel.config import load_config
from flywheel.registry import Registry, RegistryLockedError
from tests.helpers.models import tiny_overrides

pytestmark = pytest.mark.slow  # a real Prefect server and a served nightly run that trains

REPO = Path(__file__).resolve().parents[1]
NAME = "tiny-nightly"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    """Stop a process this test started (its own process group: the server's workers go with it)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(API URL, overrides of the tiny config, registry root) with a real Prefect server up and PREFECT_API_URL set."""
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        work = tmp_path_factory.mktemp("nightly")
        overrides = tiny_overrides(work, work / "registry")
        pipeline.run(load_config(None, overrides))  # iteration 1, while the server starts
        url = f"http://127.0.0.1:{port}/api"

        def healthy():
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("the Prefect server", healthy, timeout=180)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url, overrides, work / "registry"
            APILogWorker.drain_all(timeout=5)  # this process's flow logs, sent while the server is still up
    finally:
        _stop(proc)
        log.close()


def _flow_runs(state: str | None = None):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )

    state_filter = FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=[state]))) if state else None
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[NAME])),
                                     flow_run_filter=state_filter)
    return sorted(runs, key=lambda r: r.expected_start_time)


def _deployment():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(f"flywheel-nightly/{NAME}")


def test_a_schedule_creates_runs_at_the_cron_times(server, capsys):
    _, overrides, _ = server
    assert cli_main(["schedule", "--cron", "0 2 * * *", "--timezone", "UTC", "--name", NAME, *overrides]) == 0
    scheduled = _wait("scheduled runs", lambda: len(_flow_runs("Scheduled")) >= 2 and _flow_runs("Scheduled"), 90)
    times = [r.expected_start_time.astimezone(timezone.utc) for r in scheduled]
    now = datetime.now(timezone.utc)
    assert all((t.hour, t.minute, t.second) == (2, 0, 0) for t in times), times
    assert now < times[0] <= now + timedelta(days=1)
    assert all(b - a == timedelta(days=1) for a, b in zip(times, times[1:])), times

    capsys.readouterr()
    assert cli_main(["schedule", "list"]) == 0
    listed = capsys.readouterr().out
    assert NAME in listed and "0 2 * * * UTC" in listed and f"{times[0]:%Y-%m-%d}" in listed

    assert cli_main(["schedule", "pause", NAME]) == 0
    assert _deployment().paused
    _wait("the paused schedule's runs to go", lambda: not _flow_runs("Scheduled"), 30)
    assert cli_main(["schedule", "resume", NAME]) == 0
    assert not _deployment().paused


def test_bad_schedules_are_refused_before_registering(server, capsys):
    _, overrides, _ = server
    assert cli_main(["schedule", "--cron", "61 2 * * *", "--name", "bad", *overrides]) == 2
    assert cli_main(["schedule", "--cron", "0 2 * * *", "--timezone", "Mars/Olympus", "--name", "bad", *overrides]) == 2
    assert cli_main(["schedule", "--cron", "0 2 * * *", "--name", "bad", "generate.n=oops"]) == 2
    assert cli_main(["schedule", "pause", "no-such-schedule"]) == 2
    out = capsys.readouterr().out
    assert "--cron" in out and "--timezone" in out and "generate.n" in out and "no schedule named" in out
    assert cli_main(["schedule", "list"]) == 0 and "bad" not in capsys.readouterr().out


def test_a_run_started_now_adds_the_next_iteration(server, capsys):
    url, overrides, root = server
    with Registry(root) as reg:
        before = {m["name"]: m for m in reg.rows("SELECT * FROM models")}
        done = reg.rows("SELECT stage_run_id, finished_at FROM stage_runs ORDER BY 1")
    assert sorted(before) == ["M1", "M2", "PT"]

    env = {**os.environ, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log_path = root.parent / "serve.log"
    with open(log_path, "w") as log:
        serve = subprocess.Popen([sys.executable, "-m", "flywheel.cli", "schedule", "serve"], env=env, cwd=REPO,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        capsys.readouterr()
        assert cli_main(["schedule", "run", NAME]) == 0
        run_id = re.search(r"\(([0-9a-f-]{36})\)", capsys.readouterr().out).group(1)

        def finished():
            assert serve.poll() is None, log_path.read_text()[-3000:]
            state = next(r for r in _flow_runs() if str(r.id) == run_id).state
            return state if state.is_final() else None

        state = _wait("the nightly run", finished, timeout=480, every=2)
        assert state.is_completed(), f"{state.name}: {state.message}\n{log_path.read_text()[-3000:]}"
    finally:
        _stop(serve, signal.SIGINT)
    assert "1 iteration(s) finished" in log_path.read_text()

    with Registry(root) as reg:
        after = {m["name"]: m for m in reg.rows("SELECT * FROM models")}
        assert sorted(after) == ["M1", "M2", "M3", "PT"]  # one more model: M3, trained from M2
        assert after["M3"]["parent_id"] == before["M2"]["model_id"] and after["M3"]["kind"] == "dpo"
        assert Path(after["M3"]["path"], "model.safetensors").is_file()
        latest = reg.rows("SELECT run_id, status, json_extract(config, '$.run.iterations')::INT AS n FROM runs "
                          "ORDER BY created_at DESC LIMIT 1")[0]
        assert (latest["status"], latest["n"]) == ("done", 2)
        # iteration 1 was not computed again: its stages kept their ledger rows as they were
        now_done = reg.rows("SELECT stage_run_id, finished_at FROM stage_runs")
        assert {r["stage_run_id"]: r["finished_at"] for r in done}.items() <= {
            r["stage_run_id"]: r["finished_at"] for r in now_done}.items()
    # the schedule itself is still there, its nightly runs still scheduled
    assert not _deployment().paused and _wait("scheduled runs", lambda: _flow_runs("Scheduled"), 30)


# --- retries: only what a wait can fix ----------------------------------------------------------------------------

def test_tasks_retry_transient_failures_only(server):
    from prefect import flow, task

    from flows.nightly import retry_transient

    attempts = {"busy": 0, "bad": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def busy_once():
        attempts["busy"] += 1
        if attempts["busy"] == 1:
            raise RegistryLockedError("the registry is in use by another process (a reader)")
        return "ok"

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def bad_config():
        attempts["bad"] += 1
        raise ValueError("generate.n: Input should be a valid integer")

    @flow
    def both():
        return busy_once(), bad_config(return_state=True)

    value, state = both()
    assert value == "ok" and attempts["busy"] == 2  # retried once, then succeeded
    assert state.is_failed() and attempts["bad"] == 1  # not retried
