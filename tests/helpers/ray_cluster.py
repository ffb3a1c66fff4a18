"""A real Ray cluster on this machine for tests and benches: `ray start --head` bound to 127.0.0.1, as a subprocess.

    with ray_head(num_cpus=2) as address:      # "127.0.0.1:<port>"
        cfg = load_config(..., [f"ray.address={address}", "generate.backend=ray"])

The head runs with `--block` in its own process group (its GCS, raylet and workers are its children), so leaving the
block kills exactly this cluster, never another Ray on the machine. Its session files go to a short temporary folder
(Ray's socket paths must stay under 107 characters). Start-up takes ~5-20 s on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, timeout_s: float = 180.0):
    """Start a head node with `num_cpus` CPUs on 127.0.0.1 and yield its address; kill it on the way out."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    log = open(temp / "head.log", "wb")
    cmd = [_ray_executable(), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           f"--num-cpus={num_cpus}", "--num-gpus=0", f"--temp-dir={temp}", "--include-dashboard=false",
           "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
           f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
           f"--min-worker-port={port + 1000 if port < 60000 else 10002}",
           f"--max-worker-port={port + 1100 if port < 60000 else 10102}"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        _wait_ready(head, address, temp, timeout_s)
        yield address
    finally:
        _stop(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to the head's process group, then SIGKILL to whatever of its tree is left after 5 s. Ray's workers
    (ray::IDLE, ray::_StatsActor...) are the raylet's children: they are collected first, while the tree is whole."""
    import psutil

    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=5)
    for p in [*alive]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()


def _wait_ready(head: subprocess.Popen, address: str, temp: Path, timeout_s: float) -> None:
    """Until a raylet of this cluster has registered (the GCS answers on `address` and a node is alive)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start --head exited with status {head.returncode}: "
                               f"{(temp / 'head.log').read_text(errors='replace')[-2000:]}")
        probe = subprocess.run([_ray_executable(), "status", f"--address={address}"], capture_output=True, text=True)
        if probe.returncode == 0 and "node_" in probe.stdout:
            return
        time.sleep(1.0)
    raise TimeoutError(f"the Ray head at {address} was not ready in {timeout_s:.0f} s; log: {temp / 'head.log'}")
