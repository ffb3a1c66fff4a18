"""The registry lock: one run at a time writes a registry.

    with registry_lock(cfg.registry.root, run_id):
        ...  # stages open and close the DuckDB file as they like; no other run can start meanwhile

DuckDB lets one process write a file, and each stage opens and closes its own connection, so two runs on one registry
would collide at random moments (one stage's open failing while the other run holds the file). A run therefore holds
an exclusive `fcntl.flock` on `<registry root>/flywheel.registry.lock` from start to end. The operating system drops a flock
when its process dies, so a run killed with SIGKILL never leaves a stale lock behind. The holder writes who it is into
the file (pid, host, run id, command, start time); a second run fails at once with `RegistryBusyError`, whose message
names that holder.

The lock is re-entrant within one process: a nightly run that takes it to decide which iteration is next and then
calls `run_flywheel` (which takes it again) keeps it throughout, and the inner holder's run id is written in.
Readers (`flywheel report`, `summary`, ...) do not take it. The file itself stays in place: deleting a lock file
races with processes about to lock it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from .base import RegistryLockedError, check_root, now

LOCK_NAME = "flywheel.registry.lock"


@dataclass(frozen=True)
class LockHolder:
    """Who holds a registry's lock, as written in the lock file."""

    pid: int
    host: str
    run_id: str
    command: str
    started_at: str

    def describe(self) -> str:
        return (f"run {self.run_id} (pid {self.pid} on {self.host}, since {self.started_at}; "
                f"command: {self.command})")


class RegistryBusyError(RegistryLockedError):
    """Another run holds the registry's lock; `holder` says which (None when it could not be read)."""

    def __init__(self, root: Path, holder: LockHolder | None):
        self.root, self.holder = Path(root), holder
        who = holder.describe() if holder else "another process (its details could not be read)"
        super().__init__(f"the registry {self.root} is in use by {who}. Wait for it to finish or stop it; "
                         "a killed run frees the registry by itself")


def lock_path(root: str | Path) -> Path:
    return Path(root) / LOCK_NAME


def read_holder(root: str | Path) -> LockHolder | None:
    """The holder written in the lock file, or None if the file is missing or empty (free, or just released).
    A holder writes its details right after locking; a read that lands in between is retried briefly."""
    path = lock_path(root)
    for _ in range(20):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        if not text.strip():
            return None
        try:
            return LockHolder(**json.loads(text))
        except (ValueError, TypeError):
            time.sleep(0.05)  # half-written, or written by another version: read again
    return None


def is_locked(root: str | Path) -> bool:
    """Whether some process holds the lock (this one included). Probes with a non-blocking lock, so it can make a
    run that starts at the very same instant see the registry busy; use it for reports, not for decisions."""
    path = lock_path(root)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


class _Held:
    def __init__(self, fd: int):
        self.fd, self.depth = fd, 0


_held: dict[str, _Held] = {}
_guard = threading.Lock()


def _write_holder(fd: int, holder: LockHolder) -> None:
    data = json.dumps(asdict(holder)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


@contextmanager
def registry_lock(root: str | Path, run_id: str, command: str | None = None) -> Iterator[LockHolder]:
    """Hold the registry's lock for the duration of the block; raise `RegistryBusyError` at once if another process
    holds it. `command` defaults to this process's command line."""
    root = Path(root)
    check_root(root)  # a root that is a file, or cannot be made: said as such
    path = lock_path(root)
    key = os.path.realpath(path)
    holder = LockHolder(pid=os.getpid(), host=socket.gethostname(), run_id=run_id,
                        command=command if command is not None else " ".join(sys.argv),
                        started_at=now().isoformat(timespec="seconds"))
    with _guard:
        held = _held.get(key)
        if held is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses (PEP 446)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RegistryBusyError(root, read_holder(root)) from None
            held = _held[key] = _Held(fd)
        previous = read_holder(root) if held.depth else None
        _write_holder(held.fd, holder)
        held.depth += 1
    try:
        yield holder
    finally:
        with _guard:
            held.depth -= 1
            if held.depth:
                if previous is not None:
                    _write_holder(held.fd, previous)  # the outer holder again
            else:
                del _held[key]
                os.ftruncate(held.fd, 0)
                fcntl.flock(held.fd, fcntl.LOCK_UN)
                os.close(held.fd)
