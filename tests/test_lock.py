"""The registry lock with real processes: a second run fails at once naming the first; a killed holder's lock is free.

Process A takes the lock and writes to the registry, pausing half-way; process B is a real `flywheel run` on the same
registry, which must stop before doing anything, naming A's pid and run id. Then A finishes and its rows are all
there. A holder killed with SIGKILL leaves the lock free, since the operating system drops a dead process's flock.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from flywheel.registry import Registry, RegistryLockedError
from flywheel.registry.lock import LOCK_NAME, RegistryBusyError, is_locked, read_holder, registry_lock
from flywheel.schedule import is_transient
from flywheel.stages.seeds import load_seeds

HOLDER = """
import sys
from flywheel.config import load_config
from flywheel.registry.lock import registry_lock
from flywheel.registry import Registry, now
from flywheel.registry.runs import start_run
from flywheel.stages.seeds import load_seeds
cfg = load_config(None, [f"registry.root={sys.argv[1]}", "run.name=holder"])
with registry_lock(cfg.registry.root, sys.argv[2]):
    with Registry(cfg.registry.root) as reg:
        run_id = start_run(reg, cfg)
    print("locked", flush=True)
    sys.stdin.readline()  # the parent lets it go on
    with Registry(cfg.registry.root) as reg:
        reg.insert("prompts", [dict(prompt_id=f"p-{i}", run_id=run_id, iteration=0, source="seed", text=s.instruction,
                                    reference=s.response, seed_id=s.id, few_shot_ids=None, kept=True, drop_reason=None,
                                    model_id=None, stage_run_id="seeds-x", config_hash="h", created_at=now())
                               for i, s in enumerate(load_seeds("seeds/demo.jsonl"))])
        reg.finish_run(run_id, "done")
print("finished", flush=True)
"""


def _start_holder(root, run_id):
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), run_id], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


@pytest.mark.slow  # a real `flywheel run` in a subprocess
def test_a_second_run_fails_at_once_naming_the_first(tmp_path):
    root = tmp_path / "registry"
    holder = _start_holder(root, "run-A")
    try:
        # a real `flywheel run` on the same registry
        other = subprocess.run([sys.executable, "-m", "flywheel.cli", "run", "--config", "tests/small.yaml",
                                f"registry.root={root}"], capture_output=True, text=True, timeout=300)
        out = " ".join((other.stdout + other.stderr).split())  # rich wraps long lines
        assert other.returncode == 1, out
        assert "in use by run run-A" in out and f"pid {holder.pid}" in out
        assert "iteration(s)" not in out  # it stopped before starting anything
        # and in this process, the error carries the holder
        with pytest.raises(RegistryBusyError) as e:
            with registry_lock(root, "run-B"):
                pass
        assert (e.value.holder.pid, e.value.holder.run_id) == (holder.pid, "run-A")
        assert isinstance(e.value, RegistryLockedError)
    finally:
        out, _ = holder.communicate("go\n", timeout=120)
    assert holder.returncode == 0 and "finished" in out
    with Registry(root) as reg:  # A's rows are complete, and B left nothing
        assert reg.rows("SELECT name, status FROM runs") == [{"name": "holder", "status": "done"}]
        seeds = len(load_seeds("seeds/demo.jsonl"))
        assert reg.con.execute("SELECT count(*), count(DISTINCT prompt_id) FROM prompts").fetchone() == (seeds, seeds)
    assert not is_locked(root) and read_holder(root) is None


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    root = tmp_path / "registry"
    holder = _start_holder(root, "run-killed")
    assert is_locked(root) and read_holder(root).run_id == "run-killed"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    assert not is_locked(root)
    with registry_lock(root, "run-next") as me:
        assert read_holder(root) == me
    assert (root / LOCK_NAME).read_text() == ""  # released: the holder's details are cleared


def test_the_lock_is_reentrant_within_a_process_and_exclusive_across(tmp_path):
    probe = ("import sys\nfrom flywheel.registry.lock import registry_lock, RegistryBusyError\n"
             "try:\n    with registry_lock(sys.argv[1], 'probe'): print('got it')\n"
             "except RegistryBusyError as e: print(e)")
    with registry_lock(tmp_path, "nightly", command="flywheel schedule serve"):
        with registry_lock(tmp_path, "demo-1234"):  # run_flywheel inside a nightly run
            assert read_holder(tmp_path).run_id == "demo-1234"
            other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
            assert "in use by run demo-1234" in other.stdout and f"pid {os.getpid()}" in other.stdout
        assert read_holder(tmp_path).run_id == "nightly"
        assert json.loads((tmp_path / LOCK_NAME).read_text())["command"] == "flywheel schedule serve"
    other = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True)
    assert other.stdout.strip() == "got it"


def test_only_waitable_failures_are_transient(tmp_path):
    assert is_transient(RegistryLockedError("the DuckDB file is open in another process"))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(RegistryBusyError(tmp_path, None))  # another run: hours, not seconds
    assert not is_transient(ValueError("generate.n: bad")) and not is_transient(None)
