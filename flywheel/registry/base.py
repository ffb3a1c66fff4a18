"""What the registry's store (store.py), its run lock (lock.py) and the writers of its files share: the errors of
opening a registry, the root check, the clock, and finding what a killed writer left."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path


class RegistrySchemaError(RuntimeError):
    """The registry file was written by a flywheel with another schema."""


def now() -> datetime:
    return datetime.now(timezone.utc)


class RegistryLockedError(RuntimeError):
    """Another process holds the registry's DuckDB file (and kept it past the wait)."""


class RegistryDamagedError(RuntimeError):
    """The registry cannot be opened for a reason other than another process: a corrupt or truncated file, a
    read-only folder, a root that is a file. The message names the cause and the command that repairs it."""


class RegistryMissingError(ValueError):
    """A reader was pointed at a folder that holds no registry."""


def check_root(root: Path, create: bool = True) -> None:
    """RegistryDamagedError when the registry root is a file or cannot be made; else make it (with `create`)."""
    if root.exists() and not root.is_dir():
        raise RegistryDamagedError(f"registry.root {root} is a file, not a folder. Point registry.root at a folder "
                                   f"(registry.root=DIR), or move the file aside: mv {root} {root}.bak")
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryDamagedError(f"cannot create the registry folder {root}: {e.strerror}") from None


def dead_leftovers(folder: Path, pattern: str) -> list[Path]:
    """Temp files or folders named `<...>-<pid>` under `folder` whose process is gone: what a killed attempt left."""
    found = []
    for path in Path(folder).glob(pattern):
        pid = path.name.split("-")[-1].split(".")[0]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                found.append(path)
            except PermissionError:  # alive, another user's
                pass
    return found
