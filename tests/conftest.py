import os
import tempfile
from pathlib import Path

import pytest

# Prefect reads its settings when imported: give the whole session its own home before any test imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="flywheel-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny models on 2 cores: one torch thread is faster than two fighting over the cores (and each subprocess inherits it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Configs name seeds and templates relative to the repository root, as the README's commands run there."""
    monkeypatch.chdir(REPO)


@pytest.fixture(scope="session")
def prefect_api():
    """Prefect's own local API (a temporary server on SQLite), once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a shared 2-core machine torch's default threads contend (a tiny
    model's training took 67 s with 2, 5 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
