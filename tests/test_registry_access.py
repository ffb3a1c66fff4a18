"""Who may open the registry when, and what a damaged one says.

Readers (`report`, `datasets`, `lineage`, `resume --list`, `eval`, `verify`) open the DuckDB file read-only and
never take the run lock; the run opens it only while it reads or writes, and each side waits for the other's
moment with the file. These tests use real processes: DuckDB's file lock is per process.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from flywheel.cli import main as cli_main
from flywheel.registry import (Registry, RegistryDamagedError, RegistryLockedError, RegistryMissingError, reader)
from flywheel.registry.lock import registry_lock
from tests.helpers import REPO
from tests.helpers.models import tiny_overrides

FLYWHEEL = [sys.executable, "-m", "flywheel.cli"]

HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "ro")
print("held", flush=True)
time.sleep(float(sys.argv[3]))
con.close()
"""


def _hold(path: Path, mode: str, seconds: float) -> subprocess.Popen:
    """Another process holding the DuckDB file (read-only or read-write) for `seconds`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode, str(seconds)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def registry(tmp_path) -> Path:
    with Registry(tmp_path / "reg") as reg:
        reg.start_run("r", "r", "h", {})
    return tmp_path / "reg"


def test_the_run_process_waits_for_a_reader_then_writes(registry):
    proc = _hold(registry / "flywheel.duckdb", "ro", 1.5)
    t0 = time.monotonic()
    with Registry(registry) as reg:  # a writer: waits for the reader's file lock to go
        reg.finish_run("r", "done")
    assert time.monotonic() - t0 > 0.5
    proc.wait()
    with reader(registry) as reg:
        assert reg.scalar("SELECT status FROM runs") == "done"


def test_a_writer_that_waits_too_long_names_the_holder(registry):
    proc = _hold(registry / "flywheel.duckdb", "ro", 5)
    try:
        with pytest.raises(RegistryLockedError, match=f"pid {proc.pid}"):
            Registry(registry, wait_s=0.5)
    finally:
        proc.kill()


def test_a_reader_waits_for_the_run_and_readers_share(registry):
    proc = _hold(registry / "flywheel.duckdb", "rw", 1.5)
    t0 = time.monotonic()
    with reader(registry) as reg:
        assert reg.scalar("SELECT count(*) FROM runs") == 1
        assert time.monotonic() - t0 > 0.5
        other = _hold(registry / "flywheel.duckdb", "ro", 0)  # a second reader opens beside this one at once
        other.wait()
    proc.wait()


def test_a_reader_neither_writes_nor_creates(tmp_path, registry):
    with pytest.raises(RegistryMissingError, match="no registry"):
        reader(tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()
    with reader(registry) as reg, pytest.raises(Exception, match="read-only"):
        reg.con.execute("DELETE FROM runs")


def test_the_connection_is_released_and_reopened(registry):
    with Registry(registry) as reg:
        reg.release()
        proc = _hold(registry / "flywheel.duckdb", "ro", 0)  # gets in while this registry object is idle
        assert proc.wait() == 0
        assert reg.scalar("SELECT count(*) FROM runs") == 1  # reopened on use


def test_an_old_registry_is_brought_forward_in_place(tmp_path):
    import duckdb

    from flywheel.registry.store import SCHEMA

    path = tmp_path / "flywheel.duckdb"
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    con.execute("ALTER TABLE models DROP COLUMN weights_sha256")
    con.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    con.close()
    with reader(tmp_path) as reg:  # read as it is
        assert "weights_sha256" not in [c[0] for c in reg.con.execute("DESCRIBE models").fetchall()]
    with Registry(tmp_path) as reg:
        assert "weights_sha256" in [c[0] for c in reg.con.execute("DESCRIBE models").fetchall()]
        assert reg.scalar("SELECT value FROM meta WHERE key = 'schema_version'") == "3"


# --- damage is reported as damage ----------------------------------------------------------------------------------

def _damaged(root: Path, kind: str) -> None:
    db = root / "flywheel.duckdb"
    if kind == "empty":
        db.write_bytes(b"")
    elif kind == "corrupt":
        data = bytearray(db.read_bytes())
        for i in range(0, len(data), 4096):
            data[i + 64:i + 80] = b"\xff" * 16
        db.write_bytes(bytes(data))
    elif kind == "truncated":
        with open(db, "r+b") as f:
            f.truncate(4096 + 100)


@pytest.mark.parametrize("kind, words", [("empty", "is empty (0 bytes)"), ("corrupt", "is corrupt"),
                                         ("truncated", "is truncated")])
def test_a_damaged_file_says_so_and_how_to_restore(registry, kind, words, capsys):
    _damaged(registry, kind)
    for open_it in (Registry, reader):
        with pytest.raises(RegistryDamagedError) as e:
            open_it(registry)
        assert words in str(e.value) and "mv " in str(e.value) and "another process" not in str(e.value)
    assert cli_main(["report", "--registry", str(registry)]) == 1
    out = capsys.readouterr().out
    assert words in out and "Traceback" not in out


def test_a_root_that_is_a_file(tmp_path, capsys):
    root = tmp_path / "reg"
    root.write_text("not a folder")
    with pytest.raises(RegistryDamagedError, match="is a file"):
        Registry(root)
    with pytest.raises(RegistryDamagedError, match="is a file"):
        with registry_lock(root, "r"):
            pass
    assert cli_main(["run", "--config", "tests/small.yaml", f"registry.root={root}"]) == 1
    assert "is a file" in capsys.readouterr().out


def test_a_read_only_registry_is_named_as_such(registry):
    cmd = []
    if os.geteuid() == 0:  # root writes anywhere: read it as another user, from a folder that user can reach
        outside = Path(tempfile.mkdtemp(prefix="flywheel-ro-"))
        os.chmod(outside, 0o755)
        registry = Path(shutil.copytree(registry, outside / "reg"))
        for path in (registry, registry / "flywheel.duckdb"):
            shutil.chown(path, "nobody")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    os.chmod(registry / "flywheel.duckdb", 0o444)
    os.chmod(registry, 0o555)
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from flywheel.registry import Registry, reader\n"
            "try:\n    Registry(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
            "with reader(sys.argv[1]) as reg:\n    print('read', reg.scalar('SELECT count(*) FROM runs'))\n")
    out = subprocess.run([*cmd, sys.executable, "-c", code, str(registry), str(REPO)], capture_output=True,
                         text=True, cwd="/").stdout
    assert "RegistryDamagedError" in out and "not writable" in out and "chmod -R u+w" in out
    assert "read 1" in out  # a reader still reads it


# --- the lock comes first -------------------------------------------------------------------------------------------

LOCK_HOLDER = """
import sys, time
from flywheel.registry.lock import registry_lock
with registry_lock(sys.argv[1], "other-run"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_run_is_refused_before_its_checks(tmp_path, capsys):
    root = tmp_path / "reg"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(root)], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        # a seed file that is missing would fail the checks: the busy registry is said first
        rc = cli_main(["run", "--config", "tests/small.yaml", f"registry.root={root}", "seeds.path=/nonexistent"])
        out = capsys.readouterr().out
        assert rc == 1 and "other-run" in out and "nonexistent" not in out
    finally:
        holder.kill()


# --- real runs -----------------------------------------------------------------------------------------------------

def _children_serving_prefect(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.slow
def test_readers_loop_while_a_run_writes_and_neither_stops(tmp_path):
    """`report` and `datasets list` in a loop, plus a tight read-only loop in this process, against a real run: the run
    ends with rc 0, every reader call succeeds, and readers got in while the run was going."""
    root = tmp_path / "reg"
    run = subprocess.Popen([*FLYWHEEL, "run", "--config", "tests/small.yaml", *tiny_overrides(tmp_path, root)],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results: dict[str, list[int]] = {"report": [], "datasets": [], "inline": []}
    errors: list[str] = []

    def cli_loop(name, args):
        while run.poll() is None:
            if not (root / "flywheel.duckdb").is_file():
                time.sleep(0.5)
                continue
            p = subprocess.run([*FLYWHEEL, *args, "--registry", str(root)], cwd=REPO, capture_output=True, text=True)
            if run.poll() is None:
                results[name].append(p.returncode)
                if p.returncode:
                    errors.append(p.stdout + p.stderr)

    def inline_loop():
        while run.poll() is None:
            try:
                with reader(root) as reg:
                    reg.scalar("SELECT count(*) FROM stage_runs")
                results["inline"].append(0)
            except RegistryMissingError:
                pass
            except Exception as e:  # noqa: BLE001 (any failure is what this test looks for)
                errors.append(repr(e))
            time.sleep(0.05)

    threads = [threading.Thread(target=cli_loop, args=("report", ["report"])),
               threading.Thread(target=cli_loop, args=("datasets", ["datasets", "list"])),
               threading.Thread(target=inline_loop)]
    for t in threads:
        t.start()
    out, _ = run.communicate(timeout=900)
    for t in threads:
        t.join()
    print({k: len(v) for k, v in results.items()}, "reader calls while the run went; errors:", len(errors))
    assert run.returncode == 0, out[-3000:]
    assert not errors, errors[:3]
    assert len(results["report"]) >= 2 and len(results["datasets"]) >= 2 and len(results["inline"]) >= 20, results


@pytest.mark.slow
def test_a_killed_run_leaves_no_prefect_server(tmp_path):
    root = tmp_path / "reg"
    run = subprocess.Popen([*FLYWHEEL, "run", "--config", "tests/small.yaml", *tiny_overrides(tmp_path, root)],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    servers: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        while not servers and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.5)
            servers = _children_serving_prefect(run.pid)
        assert servers, "the run never started Prefect's API server"
        run.send_signal(signal.SIGKILL)  # only the run; its children are left to fend for themselves
        run.wait()
        gone, alive = psutil.wait_procs(servers, timeout=20)
        assert not alive, f"Prefect servers outlived the killed run: {[p.pid for p in alive]}"
    finally:
        for p in [psutil.Process(run.pid), *servers] if run.poll() is None else servers:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
