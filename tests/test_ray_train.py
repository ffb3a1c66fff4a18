"""train.launch.mode=ray: DPO as a Ray Train job of 2 CPU workers on a real Ray cluster (`ray start --head`, 2 CPUs),
real training steps, a real DuckDB registry; a failing job keeps its folder; no Ray process is left behind.
"""

import json
import math

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from flywheel.backends.models import load
from flywheel.config import ConfigError, load_config
from flywheel.registry import Registry
from flywheel.stage import IterationState, StageContext
from flywheel.stages.pairs import build_pairs
from flywheel.training.dpo import train_dpo
from flywheel.training.job import TrainJob
from flywheel.training.launch import TrainProcessError, check_ray_launch, run_ray
from tests.helpers.models import save_random_tiny_model
from tests.helpers.ray_cluster import ray_head
from tests.helpers.registry import register_arithmetic

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]  # a Ray cluster, real training steps

JUDGE_SID = "judge-t"
# prompt -> candidate -> judge scores: 8 prompts of 3 candidates, one pair each
SCORES = {f"p{i}": {f"p{i}a": [5, 4], f"p{i}b": [1], f"p{i}c": [3]} for i in range(8)}


class Cluster:
    """The module's Ray head; `close()` stops it (idempotent), so a test can check what is left afterwards."""

    def __init__(self):
        self._head = ray_head(num_cpus=2)
        self.address = self._head.__enter__()

    def close(self):
        if self._head is not None:
            head, self._head = self._head, None
            head.__exit__(None, None, None)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """M1: a random tiny Llama (the model DPO trains)."""
    return {"m1": save_random_tiny_model(tmp_path_factory.mktemp("models") / "m1")}


def _config(tmp_path, address, *overrides):
    return load_config(None, [f"registry.root={tmp_path}", "run.device=cpu", "dpo.batch_size=4", "dpo.max_length=96",
                              "dpo.learning_rate=5e-3", "dpo.dropout=0", "train.launch.mode=ray",
                              "train.launch.num_processes=2", "ray.cpus_per_worker=1", f"ray.address={address}",
                              *overrides])


def _registry(cfg, models) -> None:
    """M1 (and M2) registered; prompts (with references), 3 candidates each and their judge samples."""
    register_arithmetic(cfg.registry.root, models, SCORES, JUDGE_SID)


def _ray_children() -> list[str]:
    """Ray processes under this test process (the head, its raylet, GCS and workers), by command line."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "ray" in cmd.lower():
            found.append(f"{p.pid} {cmd[:120]}")
    return found


def test_dpo_trains_as_a_ray_train_job_of_two_cpu_workers(tmp_path, models, cluster):
    """8 pairs, dpo.batch_size 4 per process, 2 workers: each worker trains on half (1 step of 4 pairs, not 2 steps
    as one process would), rank 0 saves M2 and the stage registers it."""
    import ray

    cfg = _config(tmp_path, cluster.address)
    _registry(cfg, models)
    pairs = build_pairs(cfg, "r", 1, JUDGE_SID)
    result = train_dpo(StageContext(cfg, "r", 1), IterationState(model="m1", pairs=pairs.stage_run_id, m1="m1"))
    s = result.stats
    assert not ray.is_initialized()  # the driver disconnected
    assert not (tmp_path / "jobs" / result.stage_run_id).exists()  # removed after success

    assert s["pairs"] == 8 and s["world_size"] == 2 and s["steps"] == 1  # 8 pairs / (4 per worker x 2 workers)
    assert math.isfinite(s["train_loss"]) and s["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    with Registry(cfg.registry.root) as reg:
        row = reg.model(s["model_id"])
    metrics = json.loads(row["metrics"])
    assert (row["kind"], row["name"], row["parent_id"]) == ("dpo", "M2", "m1")
    assert metrics["world_size"] == 2 and metrics["pairs"] == 8
    before = AutoModelForCausalLM.from_pretrained(str(models["m1"])).state_dict()
    model, _ = load(row["path"])  # loadable as any model
    after = model.state_dict()
    assert set(before) == set(after)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])
    print(f"\nDPO as a Ray Train job (2 CPU workers): {s['seconds_per_step']:.3f} s/step; stage wall "
          f"{s['wall_s']:.1f} s")


def test_a_failing_job_keeps_its_folder(tmp_path, cluster):
    """M_t's folder is gone: the worker fails loading it; TrainProcessError names the kept job folder. One worker:
    Ray Train's start-up is most of this test's time, and two workers fail alike."""
    import ray

    cfg = _config(tmp_path, cluster.address, "train.launch.num_processes=1")
    job = TrainJob("dpo", str(tmp_path / "no-such-model"), str(tmp_path / "out"),
                   [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4)
    folder = tmp_path / "jobs" / "dpo-x"
    with pytest.raises(TrainProcessError, match="job kept in") as e:
        run_ray(cfg, job, folder)
    assert str(folder) in str(e.value)
    assert (folder / "job.json").is_file() and (folder / "rows.parquet").is_file()
    assert not (folder / "metrics.json").exists() and not (tmp_path / "out").exists()
    assert not ray.is_initialized()


def test_unsupported_settings_are_refused_before_any_work(tmp_path, cluster, monkeypatch):
    cfg = _config(tmp_path, cluster.address, "run.device=cuda",
                  "train.launch.deepspeed_config=configs/deepspeed/zero2.json")
    job = TrainJob("dpo", "m", str(tmp_path / "out"), [])
    with pytest.raises(ConfigError, match="train.launch.deepspeed_config"):
        run_ray(cfg, job, tmp_path / "job")
    with pytest.raises(ConfigError, match="train.launch.num_machines"):
        check_ray_launch(_config(tmp_path, cluster.address, "train.launch.num_machines=2"))
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[ray\]"'):
        run_ray(_config(tmp_path, cluster.address), job, tmp_path / "job")
    assert not (tmp_path / "job").exists()  # nothing written


def test_no_ray_process_is_left(cluster):
    """Last: stop the module's head; nothing of Ray stays under this process (the drivers were disconnected)."""
    import ray

    assert not ray.is_initialized()
    cluster.close()
    assert _ray_children() == []
