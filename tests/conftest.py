import os
import tempfile
from pathlib import Path

import pytest

# Prefect reads its settings when imported: give the whole session its own home before any test imports it.
_PREFECT_HOME = tempfile.mkdtemp(prefix="flywheel-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
# Prefect's API server starts in ~10 s on a quiet machine, minutes on a loaded one: runs in subprocesses wait for it.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
# Tiny models on 2 cores: one torch thread is faster than two fighting over the cores (and each subprocess inherits it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.helpers import REPO  # noqa: E402 (after the environment above)


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


@pytest.fixture
def cfg(tmp_path):
    """The default config with its registry in this test's own temporary folder."""
    from flywheel.config import load_config

    return load_config(None, [f"registry.root={tmp_path}"])


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A random tiny Llama with its seed-trained tokenizer (tests/helpers/models.py), saved once for the session.
    Read it only: a test that changes a model makes its own (save_random_tiny_model)."""
    from tests.helpers.models import save_random_tiny_model

    return save_random_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")
