"""Prefect's local API for one `flywheel run`, started by flywheel and bound to its lifetime.

    with local_api():           # a Prefect API server on 127.0.0.1, unless PREFECT_API_URL names one already
        flywheel_flow(cfg)

Left to itself, Prefect starts a temporary API server (uvicorn) as a child process and stops it at exit; a run killed
with SIGKILL never reaches that exit, and the server lived on for minutes, holding a port and Prefect's database. This
starts the same server (Prefect's `create_app` factory under uvicorn, as `prefect server start` does) with the
kernel told to send it SIGTERM when the flywheel process dies (Linux `PR_SET_PDEATHSIG`), so no kill leaves one
behind. Elsewhere (no prctl) it falls back to Prefect's own temporary server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import httpx

PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int):
    def preexec() -> None:  # runs in the child between fork and exec
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)
    return preexec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """A Prefect API server on a free 127.0.0.1 port that dies with this process; (process, api url)."""
    from prefect.settings import get_current_settings

    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",  # as Prefect's own temporary server: fewer
           **get_current_settings().to_environment_variables(exclude_unset=True)}  # services, this process's settings
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "error", "--lifespan", "on"],
        env=env, preexec_fn=_die_with_parent(os.getpid()))
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Prefect's API server exited with code {proc.returncode} at start")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"Prefect's API server did not answer within {timeout_s:.0f} s "
                       "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS sets the wait)")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def local_api() -> Iterator[str | None]:
    """Prefect's API for the block: the one PREFECT_API_URL names, else a server of our own that dies with us."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        yield PREFECT_API_URL.value()
        return
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300"))
    proc, url = start_server(timeout)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10)  # the flow's last log lines reach the server before it stops
    finally:
        stop_server(proc)
