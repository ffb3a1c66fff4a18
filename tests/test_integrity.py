"""Model integrity (flywheel/registry/integrity.py) and `flywheel verify`.

Every registered model records the sha256 of its weights; a stage that loads a model checks it first and fails,
naming the model, when the folder is missing or a file changed (a tensor scaled by 1.5, three flipped bytes), with no
hub lookup; a trained model with NaN/inf weights or a non-finite final loss is refused before it is registered;
`flywheel verify` exits 1 on a damaged registry, naming each problem and its fix. The fast tests build registries by
hand; the slow ones share one tiny real run (seeds -> PT -> M1 -> M2), forked at the same path for each test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flywheel.cli import main as cli_main
from flywheel.config import load_config
from flywheel.registry import Registry, integrity
from flywheel.registry.integrity import ModelIntegrityError, NonFiniteModelError
from tests.helpers import REPO
from tests.helpers.models import save_random_tiny_model, tiny_overrides
from tests.helpers.staged import build_flywheel


# --- damage, as the red team did it ----------------------------------------------------------------------------------

def scale_a_tensor(folder: Path, factor: float = 1.5) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * np.float32(factor)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def flip_bytes(folder: Path, count: int = 3) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # the data region, after the JSON header
    for k in range(count):
        data[start + 97 + 1013 * k] ^= 0xFF
    path.write_bytes(bytes(data))


def register(reg: Registry, folder: Path, model_id: str = "sft-m1", name: str = "M1", hashed: bool = True) -> None:
    reg.register_model(model_id=model_id, run_id="run", name=name, kind="sft", iteration=0, parent_id=None,
                       path=str(folder), stage_run_id=model_id, config_hash="h", metrics={},
                       weights_sha256=integrity.weights_sha256(folder) if hashed else None)


def verify(root: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main(["verify", "--registry", str(root)])
    return code, capsys.readouterr().out


# --- the hash --------------------------------------------------------------------------------------------------------

def test_the_hash_covers_each_weight_file_by_name_and_content(tmp_path, tiny_model_path):
    from flywheel.backends.bases import folder_sha256

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_path, folder)
    sha = integrity.weights_sha256(folder)
    assert sha == folder_sha256(folder)  # a folder base's stage key is the same hash
    scan = integrity.scan_folder(folder)
    assert sorted(scan.files) == ["config.json", "model.safetensors"]
    import hashlib
    assert scan.files["model.safetensors"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()

    (folder / "training_args.bin").write_bytes(b"pickled trainer arguments")  # not weights: left out
    (folder / "tokenizer_config.json").write_text("{}")
    assert integrity.weights_sha256(folder) == sha
    (folder / "adapter_model.bin").write_bytes(b"adapter")  # any other *.bin counts
    assert integrity.weights_sha256(folder) != sha
    (folder / "adapter_model.bin").unlink()
    (folder / "model.safetensors").rename(folder / "other.safetensors")  # same bytes, another name
    assert integrity.weights_sha256(folder) != sha


def test_accept_model_hashes_and_checks_in_one_pass_and_writes_a_sha256sum_manifest(tmp_path, tiny_model_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_path, folder)
    sha = integrity.accept_model(folder, {"final_loss": 2.5}, what="M2", hint="")
    assert sha == integrity.weights_sha256(folder)
    out = subprocess.run(["sha256sum", "-c", integrity.MANIFEST], cwd=folder, capture_output=True, text=True)
    assert out.returncode == 0 and "model.safetensors: OK" in out.stdout


# --- checked on load -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", [scale_a_tensor, flip_bytes, lambda f: shutil.rmtree(f)],
                         ids=["tensor-scaled-by-1.5", "three-flipped-bytes", "folder-deleted"])
def test_a_stage_that_loads_a_damaged_model_fails_naming_it(cfg, tmp_path, damage):
    from flywheel.stages.bootstrap import import_seeds
    from flywheel.stages.generate import generate

    folder = save_random_tiny_model(tmp_path / "m1")
    seeds = import_seeds(cfg, "run")
    with Registry(cfg.registry.root) as reg:
        integrity.accept_model(folder, {}, what="M1", hint="")
        register(reg, folder)
    damage(folder)
    with pytest.raises(ModelIntegrityError) as e:
        generate(cfg, "run", 1, "sft-m1", seeds.stage_run_id)
    message = str(e.value)
    assert "model M1 (id sft-m1" in message and "flywheel verify" in message and "Repo id" not in message
    if damage is scale_a_tensor or damage is flip_bytes:
        assert "changed file(s): model.safetensors" in message and f"mv {folder} {folder}.altered" in message
    else:
        assert f"folder {folder} is missing" in message and "flywheel resume run" in message
    with Registry(cfg.registry.root) as reg:
        ledger = reg.rows("SELECT status, error FROM stage_runs WHERE stage = 'generate'")
        assert [r["status"] for r in ledger] == ["failed"] and "model M1 (id sft-m1" in ledger[0]["error"]
        assert reg.scalar("SELECT count(*) FROM candidates") == 0


def test_an_intact_model_loads_and_is_hashed_once_per_process(cfg, tmp_path, monkeypatch):
    import os
    import time

    folder = save_random_tiny_model(tmp_path / "m1")
    old = time.time() - 60  # not modified just now: its hash may be kept
    for p in folder.iterdir():
        os.utime(p, (old, old))
    with Registry(cfg.registry.root) as reg:
        register(reg, folder)
        assert integrity.model_path(reg, "sft-m1") == str(folder)
        reads = []
        monkeypatch.setattr(integrity, "_scan_safetensors", lambda *a: reads.append(a) or ("x", [], 0))
        assert integrity.model_path(reg, "sft-m1") == str(folder)  # from the per-process cache
        assert reads == []


def test_a_model_registered_without_a_hash_loads_unchecked_and_a_missing_one_is_named(cfg, tmp_path):
    from flywheel.backends.models import ModelNotFoundError, load

    folder = save_random_tiny_model(tmp_path / "m1")
    with Registry(cfg.registry.root) as reg:
        register(reg, folder, hashed=False)
        register(reg, tmp_path / "gone", model_id="dpo-m2", name="M2", hashed=False)
        assert integrity.model_path(reg, "sft-m1") == str(folder)
        with pytest.raises(ModelIntegrityError, match=r"model M2 \(id dpo-m2.*is missing"):
            integrity.model_path(reg, "dpo-m2")
        with pytest.raises(ModelIntegrityError, match="not in the registry"):
            integrity.model_path(reg, "nope")
    with pytest.raises(ModelNotFoundError, match="does not exist"):  # a bare path: no hub lookup either
        load(tmp_path / "gone")


def test_a_hub_id_base_is_not_checked_and_a_moved_registry_finds_its_models(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    with Registry(old) as reg:
        register(reg, save_random_tiny_model(reg.model_dir("sft-m1")))
        reg.register_model(model_id="base-hub", run_id="run", name="PT", kind="base", iteration=0, parent_id=None,
                           path="HuggingFaceTB/SmolLM2-135M", stage_run_id="base-hub", config_hash="h", metrics={})
    shutil.move(old, new)  # the rows still name the old folder
    with Registry(new) as reg:
        assert integrity.model_path(reg, "sft-m1") == str(new / "models" / "sft-m1")
        assert integrity.model_path(reg, "base-hub") == "HuggingFaceTB/SmolLM2-135M"
        assert integrity.check_model(reg.model("base-hub")).status == "hub"


# --- refused after training ------------------------------------------------------------------------------------------

def _nan_fit(loss: float):
    def fit(cfg, job, model, tokenizer, *, device, seed, save_dir):
        import torch

        from flywheel.backends.models import save_atomically

        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        save_atomically(model, tokenizer, Path(save_dir))
        return {"train_loss": loss, "final_loss": loss}
    return fit


@pytest.mark.parametrize("loss", [float("nan"), 0.7], ids=["nan-loss", "finite-loss"])
def test_a_trained_model_with_nan_weights_is_refused_and_not_registered(cfg, tmp_path, loss):
    from flywheel.stage import StageContext, stage_run_id
    from flywheel.training.common import train_stage
    from flywheel.training.job import Trainer, TrainJob

    folder = save_random_tiny_model(tmp_path / "m1")
    with Registry(cfg.registry.root) as reg:
        register(reg, folder)
    trainer = Trainer("dpo", section="dpo", consumes=("pairs",), stage=None, fit=_nan_fit(loss))
    inputs = {"model": "sft-m1", "test": "nan"}
    sid = stage_run_id("dpo", inputs)

    def make_job(reg, sid):
        return TrainJob("dpo", integrity.model_path(reg, "sft-m1"), str(reg.model_dir(sid)), [{"x": 1}]), {}

    with pytest.raises(NonFiniteModelError) as e:
        train_stage(StageContext(cfg, "run", 1), trainer, "sft-m1", inputs, make_job)
    message = str(e.value)
    assert message.startswith(f"M2 (dpo, iteration 1, stage {sid}): training diverged: ")
    assert "weight tensors hold NaN or inf (e.g. model.embed_tokens.weight)" in message
    assert ("final loss final_loss=nan" in message) == (loss != loss)
    assert f"lower dpo.learning_rate (now {cfg.dpo.learning_rate})" in message
    with Registry(cfg.registry.root) as reg:
        assert reg.model(sid) is None
        assert reg.scalar("SELECT status FROM stage_runs WHERE stage_run_id = ?", [sid]) == "failed"
    assert not (cfg.registry.root / "models" / sid).exists()  # deleted: a resume trains it again


def test_a_finite_model_with_a_nan_final_loss_is_refused(tmp_path, tiny_model_path):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_path, folder)
    with pytest.raises(NonFiniteModelError, match=r"final loss pg_loss=inf\. .*lower ppo.learning_rate"):
        integrity.accept_model(folder, {"pg_loss": float("inf"), "vf_loss": 1.0}, what="M2 (ppo)",
                               hint="lower ppo.learning_rate")
    assert not folder.exists()


# --- flywheel verify -------------------------------------------------------------------------------------------------

@pytest.fixture
def staged_registry(tmp_path, tiny_model_path) -> Path:
    """A run written stage by stage (tests/helpers/staged.py: seeds, PT, M1, data stages, M2, dataset versions),
    each model's folder a copy of the tiny model with its hash recorded, except PT's: registered before hashes."""
    root = tmp_path / "reg"
    build_flywheel(root)
    with Registry(root) as reg:
        for m in reg.rows("SELECT model_id, name, path FROM models"):
            shutil.copytree(tiny_model_path, m["path"])
            if m["name"] != "PT":
                sha = integrity.accept_model(m["path"], {}, what=m["name"], hint="")
                reg.con.execute("UPDATE models SET weights_sha256 = ? WHERE model_id = ?", [sha, m["model_id"]])
    return root


def test_verify_passes_a_clean_registry_and_notes_unhashed_models(staged_registry, capsys):
    code, out = verify(staged_registry, capsys)
    assert code == 0, out
    assert "note: model PT" in out and "no weights hash recorded" in out
    assert "3 model(s)" in out and "0 missing or altered" in out


def test_verify_names_every_missing_or_altered_model_and_dataset_with_its_fix(staged_registry, capsys):
    with Registry(staged_registry) as reg:
        models = {m["name"]: m for m in reg.rows("SELECT * FROM models")}
        versions = reg.rows("SELECT version_id, path FROM dataset_versions ORDER BY version_id")
    scale_a_tensor(Path(models["M2"]["path"]))
    shutil.rmtree(models["M1"]["path"])
    lost, edited = versions[0], versions[1]
    (staged_registry / lost["path"]).unlink()
    import pyarrow.parquet as pq
    table = pq.read_table(staged_registry / edited["path"])
    pq.write_table(table.slice(1), staged_registry / edited["path"])

    code, out = verify(staged_registry, capsys)
    assert code == 1
    root = staged_registry
    m1, m2 = models["M1"], models["M2"]
    assert (f"ALTERED: model M2 ({m2['model_id']}, run run-a): changed file(s): model.safetensors" in out), out
    assert f"to restore: move it aside (`mv {m2['path']} {m2['path']}.altered`), then `flywheel resume run-a " \
           f"--registry {root}` trains it again" in out
    assert f"MISSING: model M1 ({m1['model_id']}, run run-a): folder {m1['path']} is missing" in out
    assert "MISSING: dataset" in out and f"`flywheel datasets restore {lost['version_id']} --registry {root}`" in out
    assert "ALTERED: dataset" in out and f"`flywheel datasets restore {edited['version_id']} --registry {root}`" in out
    assert "4 missing or altered" in out

    cli_main(["datasets", "restore", lost["version_id"], "--registry", str(root)])  # the fixes it names work
    cli_main(["datasets", "restore", edited["version_id"], "--registry", str(root)])
    code, out = verify(staged_registry, capsys)
    assert code == 1 and "2 missing or altered" in out
    assert "MISSING: dataset" not in out and "ALTERED: dataset" not in out


# --- a real run (slow) -------------------------------------------------------------------------------------------

class Fork:
    """The tiny run's registry, copied back to one path before each test (model rows hold absolute paths)."""

    def __init__(self, base: Path):
        self.work, self.snapshot = base / "registry", base / "snapshot"
        self.overrides = tiny_overrides(base, self.work)

    def cfg(self, *extra: str):
        return load_config(None, [*self.overrides, *extra])

    def fork(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.copytree(self.snapshot, self.work)

    def models(self) -> dict[str, dict]:
        with Registry(self.work) as reg:
            return {m["name"]: m for m in reg.rows("SELECT * FROM models")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_torch_thread) -> Fork:
    from flywheel import pipeline

    run = Fork(tmp_path_factory.mktemp("integrity"))
    pipeline.run(run.cfg())
    shutil.copytree(run.work, run.snapshot)
    return run


@pytest.mark.slow
def test_every_model_of_a_tiny_run_records_its_weights_hash(tiny_run, capsys):
    tiny_run.fork()
    models = tiny_run.models()
    assert sorted(models) == ["M1", "M2", "PT"]
    for m in models.values():
        assert m["weights_sha256"] == integrity.weights_sha256(m["path"]), m["name"]
        manifest = integrity.read_manifest(Path(m["path"]))
        assert integrity.combine(manifest) == m["weights_sha256"]
    code, out = verify(tiny_run.work, capsys)
    assert code == 0 and "0 missing or altered" in out, out
    assert "note:" not in out and " 0 not checked" in out  # every model hashed
    shutil.rmtree(models["PT"]["path"])
    proc = subprocess.run([sys.executable, "-m", "flywheel.cli", "verify", "--registry", str(tiny_run.work)],
                          cwd=REPO, capture_output=True, text=True)  # the real command line
    assert proc.returncode == 1 and f"MISSING: model PT ({models['PT']['model_id']}" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_an_altered_model_stops_the_run_that_loads_it(tiny_run):
    from flywheel import pipeline
    from flywheel.registry.runs import run_id_for

    tiny_run.fork()
    m2 = tiny_run.models()["M2"]
    scale_a_tensor(Path(m2["path"]))
    cfg = tiny_run.cfg("run.iterations=2")  # iteration 2 starts from M2
    with pytest.raises(ModelIntegrityError) as e:
        pipeline.run(cfg)
    assert f"model M2 (id {m2['model_id']}" in str(e.value) and "Repo id" not in str(e.value)
    with Registry(tiny_run.work) as reg:
        assert reg.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id_for(cfg)]) == "failed"
        status = reg.scalar("SELECT status FROM stage_runs s JOIN run_stages r USING (stage_run_id) WHERE "
                            "r.run_id = ? AND r.iteration = 2 AND r.stage = 'self_instruct'", [run_id_for(cfg)])
        assert status == "failed"


@pytest.mark.slow
def test_a_deleted_model_folder_is_trained_again_by_the_next_run(tiny_run, capsys):
    from flywheel import pipeline

    tiny_run.fork()
    m1 = tiny_run.models()["M1"]
    shutil.rmtree(m1["path"])
    code, out = verify(tiny_run.work, capsys)
    assert code == 1 and f"MISSING: model M1 ({m1['model_id']}" in out
    pipeline.run(tiny_run.cfg())  # same config: M1's stage finds its folder gone and trains it again
    again = tiny_run.models()["M1"]
    assert again["model_id"] == m1["model_id"] and Path(again["path"]).is_dir()
    assert again["weights_sha256"] == m1["weights_sha256"]  # training on CPU is deterministic: the same weights
    assert integrity.check_model(again).status == "ok"
    code, out = verify(tiny_run.work, capsys)
    assert code == 0, out


@pytest.mark.slow
def test_a_deleted_final_model_is_trained_again_by_the_same_run(tiny_run):
    from flywheel import pipeline

    tiny_run.fork()
    m2 = tiny_run.models()["M2"]
    shutil.rmtree(m2["path"])
    pipeline.run(tiny_run.cfg())  # the same config: iteration 1 is recorded as finished
    assert Path(m2["path"]).is_dir(), "the run reported success with its final model missing"
    assert integrity.check_model(tiny_run.models()["M2"]).status == "ok"


@pytest.mark.slow
def test_a_learning_rate_that_overflows_the_weights_fails_the_stage_and_registers_nothing(tiny_run):
    from flywheel import pipeline
    from flywheel.registry.runs import run_id_for

    tiny_run.fork()
    cfg = tiny_run.cfg("dpo.learning_rate=1e39")  # past float32: the first step makes the weights inf, then NaN
    with pytest.raises(NonFiniteModelError, match=r"M2 \(dpo, iteration 1.*lower dpo.learning_rate \(now 1e\+39\)"):
        pipeline.run(cfg)
    with Registry(tiny_run.work) as reg:
        dpo = reg.rows("SELECT s.stage_run_id, s.status FROM stage_runs s JOIN run_stages r USING (stage_run_id) "
                       "WHERE r.run_id = ? AND r.stage = 'dpo'", [run_id_for(cfg)])
        assert [d["status"] for d in dpo] == ["failed"]
        assert reg.model(dpo[0]["stage_run_id"]) is None
        assert reg.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id_for(cfg)]) == "failed"
    assert not (tiny_run.work / "models" / dpo[0]["stage_run_id"]).exists()
