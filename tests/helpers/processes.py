"""Real subprocesses killed at a chosen point: read a child's stderr until a marker appears, then SIGKILL it.

    child = subprocess.Popen([...], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen = kill_at_marker(child, "generate: committed batch")   # what it wrote up to the kill
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading


def kill_at_marker(child: subprocess.Popen, marker: str, timeout_s: float = 300) -> str:
    """SIGKILL `child` as soon as `marker` shows in its stderr (a pipe); its stderr up to then. Fails when the child
    ends first, and kills it after `timeout_s` if the marker never comes (the suite must not hang)."""
    watchdog = threading.Timer(timeout_s, child.kill)
    watchdog.start()
    seen = b""
    try:
        while marker.encode() not in seen:
            chunk = os.read(child.stderr.fileno(), 65536)
            assert chunk, f"the child ended before {marker!r}:\n{seen.decode(errors='replace')[-3000:]}"
            seen += chunk
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        watchdog.cancel()
        child.kill()
    assert child.returncode == -signal.SIGKILL, seen.decode(errors="replace")[-3000:]
    return seen.decode(errors="replace")
