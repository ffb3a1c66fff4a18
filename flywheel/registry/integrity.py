"""Model integrity: every registered model's weights are hashed when it is registered and checked whenever a stage
loads it, and a newly trained model whose weights hold NaN or inf is refused before it is registered.

    path = model_path(reg, model_id)    # the model's folder, after checking it is there and its weights unchanged
    sha = weights_sha256(folder)        # what models.weights_sha256 records
    sha = accept_model(folder, metrics, what="M2 (dpo, iteration 1)", hint="lower dpo.learning_rate (now inf)")
    check = check_model(row)            # ModelCheck(status, detail, files): what `flywheel verify` prints

The hash (`weights_sha256`): the sha256 of each weight file (*.safetensors, *.bin, *.gguf, *.pt, *.pth, adapter
files included; not `training_args.bin`, the HF Trainer's pickled arguments, which hold a temporary path) and of
config.json, then one sha256 over "relative path NUL file hash" in sorted path order. So a renamed, missing, added
or altered weight file changes it. A hub id base that is not a local folder is registered with NULL (nothing here to
hash); so is every model registered before the column existed (`flywheel verify` reports those as not checked).

Beside the weights, `accept_model` writes `weights.sha256` (sha256sum's format: `sha256sum -c weights.sha256` checks
the folder by hand). The registry's hash is what decides; the file only lets an error name which files changed.

Cost: hashing reads every byte: about 1 s of CPU per GB here (hashlib's sha256; 540 MB, the 135M model in fp32, took
0.53-0.58 s of CPU, 0.64-1.7 s of wall time on this shared 2-core machine). A file's hash is kept for the process,
keyed by (path, size, mtime_ns, inode), so a model that several stages load in one process is read once; a file
modified less than 2 s before it was hashed is not kept (its mtime may not tell a later write apart). The NaN/inf
check of a new model runs in the same pass as its hash (each float tensor's bytes in its safetensors files) and adds
about a quarter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("flywheel")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
ALSO_HASHED = ("config.json",)        # how the weights are read: a changed config changes the model
NOT_WEIGHTS = ("training_args.bin",)  # the HF Trainer's pickled arguments (a temporary path inside)
MANIFEST = "weights.sha256"
CHUNK = 8 << 20                       # bytes read at a time (a multiple of every element size)
RACY_S = 2.0                          # a file modified more recently than this is hashed, not cached
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# float dtypes of safetensors -> how to find NaN/inf in their bytes
_FLOATS = {"F16": ("float", "<f2"), "F32": ("float", "<f4"), "F64": ("float", "<f8"),
           "BF16": ("bits", "<u2", 0x7F80), "F8_E5M2": ("bits", "u1", 0x7C), "F8_E4M3": ("bits", "u1", 0x7F)}


class ModelIntegrityError(ValueError):
    """A registered model's folder is missing, or its weight files are not those it was registered with. The message
    names the model (name and id), what is wrong, and how to check and restore the registry."""


class NonFiniteModelError(ValueError):
    """A model just trained (or built) has NaN or inf weights, or a non-finite final loss: it is not registered, and
    its folder is deleted. The message names the setting to change (usually a learning rate that is too high)."""


@dataclass
class FolderScan:
    sha256: str
    files: dict[str, str]                             # relative path -> sha256 of the file
    nonfinite: list[str] = field(default_factory=list)  # "file:tensor" holding NaN or inf
    tensors: int = 0                                  # float tensors checked


@dataclass
class ModelCheck:
    status: str            # ok | unchecked (no hash recorded) | hub (not a local folder) | missing | altered
    detail: str = ""
    path: str = ""         # where the model is (`locate`)
    files: dict[str, list[str]] = field(default_factory=dict)  # altered: {"changed"|"missing"|"added": [paths]}

    @property
    def bad(self) -> bool:
        return self.status in ("missing", "altered")


# --- hashing ---------------------------------------------------------------------------------------------------------

def weight_files(folder: str | Path) -> list[Path]:
    """The files `weights_sha256` covers, sorted by relative path."""
    folder = Path(folder)
    return sorted((p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.name not in NOT_WEIGHTS and (p.suffix in WEIGHT_SUFFIXES or p.name in ALSO_HASHED)),
                  key=lambda p: p.relative_to(folder).as_posix())


def combine(files: dict[str, str]) -> str:
    """One sha256 over (relative path, file hash) pairs in sorted path order."""
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel].encode())
    return h.hexdigest()


_cache: dict[tuple, str] = {}


def _key(path: Path) -> tuple[tuple, os.stat_result]:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino), st


def file_sha256(path: str | Path) -> str:
    """sha256 of one file (as `sha256sum` prints it), kept for the process while its size, mtime and inode hold."""
    return _scan_file(Path(path), check=False)[0]


def _scan_file(path: Path, check: bool) -> tuple[str, list[str], int]:
    """(sha256, names of tensors holding NaN/inf, float tensors checked) in one read of the file; `check` looks
    for NaN/inf in a .safetensors file's float tensors (other files are only hashed)."""
    key, st = _key(path)
    if not check and key in _cache:
        return _cache[key], [], 0
    started = time.time_ns()
    if path.suffix == ".safetensors":
        sha, bad, n = _scan_safetensors(path, st.st_size, check)
    else:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            _feed(f, h, None)
        sha, bad, n = h.hexdigest(), [], 0
    if started - st.st_mtime_ns > RACY_S * 1e9 and _key(path)[0] == key:
        _cache[key] = sha
    return sha, bad, n


def _feed(f, h, n: int | None, kind: tuple | None = None) -> bool:
    """Hash the next `n` bytes of `f` (to the end when None); with `kind`, also say whether they hold NaN/inf."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    found = False
    while n is None or n > 0:
        want = CHUNK if n is None else min(CHUNK, n)
        got = f.readinto(view[:want])
        if not got:
            if n is not None:
                raise EOFError("file ends inside a tensor")
            break
        h.update(view[:got])
        if kind is not None and not found:
            found = _nonfinite(view[:got], kind)
        if n is not None:
            n -= got
    return found


def _nonfinite(data: memoryview, kind: tuple) -> bool:
    import numpy as np

    a = np.frombuffer(data, dtype=kind[1])
    if kind[0] == "float":
        return not bool(np.isfinite(a).all())
    # the bits of an inf or NaN: exponent all ones (bfloat16, F8_E5M2); S.1111.111, its only NaN (F8_E4M3FN, no inf)
    return bool(((a & kind[2]) == kind[2]).any())


def _scan_safetensors(path: Path, size: int, check: bool) -> tuple[str, list[str], int]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = None
        if 0 <= n <= min(size - 8, 100 << 20):
            raw = f.read(n)
            h.update(raw)
            try:
                header = json.loads(raw)
            except ValueError:
                header = None
        if not isinstance(header, dict):  # not a readable safetensors header: hash what is there
            _feed(f, h, None)
            if check:
                raise NonFiniteModelError(f"{path} is not a readable safetensors file")
            return h.hexdigest(), [], 0
        start = pos = 8 + n
        tensors = []
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            begin, end = info.get("data_offsets", (0, 0))
            tensors.append((start + begin, start + end, name, info.get("dtype")))
        bad, checked = [], 0
        try:
            for begin, end, name, dtype in sorted(tensors):
                if begin < pos or end > size:
                    raise EOFError("overlapping or out-of-range tensor offsets")
                _feed(f, h, begin - pos)
                kind = _FLOATS.get(dtype) if check else None
                checked += kind is not None
                if _feed(f, h, end - begin, kind):
                    bad.append(name)
                pos = end
        except EOFError as e:
            if check:
                raise NonFiniteModelError(f"{path} is not a well-formed safetensors file ({e})") from None
        _feed(f, h, None)
    return h.hexdigest(), bad, checked


def scan_folder(folder: str | Path, check: bool = False) -> FolderScan:
    """The hash of a model folder (`weights_sha256`), each file's hash, and with `check` the tensors holding NaN/inf
    (safetensors files), all in one read of each file."""
    folder = Path(folder)
    files, bad, tensors = {}, [], 0
    for p in weight_files(folder):
        rel = p.relative_to(folder).as_posix()
        sha, nonfinite, n = _scan_file(p, check)
        files[rel] = sha
        bad += [f"{rel}:{t}" for t in nonfinite]
        tensors += n
    return FolderScan(combine(files), files, bad, tensors)


def weights_sha256(folder: str | Path) -> str:
    """What `models.weights_sha256` records for a model folder (see the module's docstring)."""
    return scan_folder(folder).sha256


# --- registering a new model -----------------------------------------------------------------------------------------

LOSS_KEYS = ("final_loss", "train_loss", "pg_loss", "vf_loss")


def accept_model(folder: str | Path, metrics: dict | None, *, what: str, hint: str) -> str:
    """Check a model just saved to `folder` before it is registered: every float tensor finite, and the final
    training loss (final_loss, else train_loss; PPO's pg_loss and vf_loss) finite. Returns its `weights_sha256` and
    writes `weights.sha256` beside the weights. Otherwise deletes the folder (so nothing can take it for a finished
    model) and raises NonFiniteModelError naming `what` and `hint` (the setting to change)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NonFiniteModelError(f"{what}: training saved no model at {folder}")
    try:
        scan = scan_folder(folder, check=True)
    except NonFiniteModelError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise NonFiniteModelError(f"{what}: {e}; the folder was deleted and nothing was registered") from None
    if not scan.files:
        raise NonFiniteModelError(f"{what}: {folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    metrics = metrics or {}
    losses = {k: metrics[k] for k in LOSS_KEYS if isinstance(metrics.get(k), (int, float))}
    if "final_loss" in losses:
        losses.pop("train_loss", None)  # the average over training; the last logged loss is what it ended with
    bad_loss = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if scan.nonfinite or bad_loss:
        shutil.rmtree(folder, ignore_errors=True)
        parts = []
        if scan.nonfinite:
            shown = ", ".join(t.split(":", 1)[1] for t in scan.nonfinite[:3])
            parts.append(f"{len(scan.nonfinite)} of {scan.tensors} weight tensors hold NaN or inf (e.g. {shown})")
        if bad_loss:
            parts.append("final loss " + ", ".join(f"{k}={v}" for k, v in bad_loss.items()))
        raise NonFiniteModelError(
            f"{what}: training diverged: {'; '.join(parts)}. The model was not registered and its folder {folder} "
            f"was deleted. {hint}")
    write_manifest(folder, scan.files)
    return scan.sha256


def write_manifest(folder: Path, files: dict[str, str]) -> None:
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text("".join(f"{sha}  {rel}\n" for rel, sha in sorted(files.items())))
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: Path) -> dict[str, str] | None:
    try:
        lines = (folder / MANIFEST).read_text().splitlines()
        return {rel: sha for sha, rel in (line.split("  ", 1) for line in lines if line.strip())}
    except (OSError, ValueError):
        return None


# --- checking a registered model -------------------------------------------------------------------------------------

def is_hub_id(row: dict) -> bool:
    """A base registered by hub id (loaded from the hub or its cache), not a local folder: nothing to hash."""
    path = str(row["path"])
    return (row.get("weights_sha256") is None and not Path(path).exists() and not Path(path).is_absolute()
            and bool(_HUB_ID.fullmatch(path)))


def locate(row: dict, root: str | Path | None = None) -> Path:
    """A registered model's folder: the path it was registered with, or, when that is gone and the registry has
    moved (`flywheel resume` on a copied registry), the same model's folder under this registry's root."""
    folder = Path(row["path"])
    if not folder.is_dir() and root is not None and (Path(root) / "models" / row["model_id"]).is_dir():
        return Path(root) / "models" / row["model_id"]
    return folder


def model_on_disk(row: dict, root: str | Path | None = None) -> bool:
    """Whether a registered model's folder is there (or it is a hub id): what a resume may take as finished."""
    return is_hub_id(row) or locate(row, root).is_dir()


def check_model(row: dict, root: str | Path | None = None) -> ModelCheck:
    """Whether a registered model's folder is there (`locate`) and holds the weights it was registered with."""
    folder = locate(row, root)
    expected = row.get("weights_sha256")
    if is_hub_id(row):
        return ModelCheck("hub", "a hub id, not a local folder: no weights hash recorded", path=str(row["path"]))
    if not folder.is_dir():
        return ModelCheck("missing", f"folder {folder} is missing", path=str(folder))
    if expected is None:
        return ModelCheck("unchecked", "no weights hash recorded (registered before models were hashed)",
                          path=str(folder))
    scan = scan_folder(folder)
    if scan.sha256 == expected:
        return ModelCheck("ok", path=str(folder))
    files: dict[str, list[str]] = {}
    manifest = read_manifest(folder)
    if manifest is not None and combine(manifest) == expected:  # the registered file list: name what changed
        files = {"missing": sorted(set(manifest) - set(scan.files)),
                 "added": sorted(set(scan.files) - set(manifest)),
                 "changed": sorted(r for r in set(manifest) & set(scan.files) if manifest[r] != scan.files[r])}
        files = {k: v for k, v in files.items() if v}
    if files:
        detail = "; ".join(f"{k} file(s): {', '.join(v)}" for k, v in files.items())
    else:
        detail = f"its weight files ({', '.join(scan.files)}) no longer hash to the registered sha256"
    if not scan.files:
        detail = f"folder {folder} holds no weight files"
    return ModelCheck("altered", f"{detail} (registered sha256 {expected[:12]}..., now {scan.sha256[:12]}...)",
                      str(folder), files)


def describe(row: dict) -> str:
    return f"model {row['name']} (id {row['model_id']}, {row['kind']}, run {row['run_id']})"


def restore_hint(row: dict, check: ModelCheck, root: Path) -> str:
    """The command(s) that bring a missing or altered model back (the stage that made it trains it again)."""
    path = check.path or row["path"]
    if row["kind"] == "base" and not Path(path).resolve().is_relative_to(Path(root).resolve()):
        return f"it is model.base itself: put the original files back in {path}"
    resume = f"flywheel resume {row['run_id']} --registry {root}"
    if check.status == "missing":
        return f"`{resume}` trains it again (same stage id)"
    return f"move it aside (`mv {path} {path}.altered`), then `{resume}` trains it again (same stage id)"


def model_path(reg, model_id: str) -> str:
    """The path of registered model `model_id`, after checking that its folder is there and its weights are those
    it was registered with (`check_model`); ModelIntegrityError otherwise, naming the model and the fix. A hub id
    base is returned as it is. The one way a stage gets a registered model to load."""
    row = reg.model(model_id)
    if row is None:
        raise ModelIntegrityError(f"model {model_id} is not in the registry {reg.path}; "
                                  f"`flywheel verify --registry {reg.root}` lists the models it holds")
    check = check_model(row, reg.root)
    if check.bad:
        raise ModelIntegrityError(
            f"{describe(row)}: {check.detail}. Nothing was loaded. To restore it: "
            f"{restore_hint(row, check, reg.root)}; `flywheel verify --registry {reg.root}` checks every model and "
            "dataset")
    return check.path


def reopen_if_missing(reg, stage_run_id: str) -> bool:
    """A finished model stage whose model folder is gone (deleted, or moved aside after `flywheel verify` found it
    altered) runs again: its model row is dropped and its ledger row reopened, so the stage trains (or builds) the
    model anew under the same id. Returns whether it did."""
    row = reg.model(stage_run_id)
    if row is None or model_on_disk(row, reg.root):
        return False
    status = reg.scalar("SELECT status FROM stage_runs WHERE stage_run_id = ?", [stage_run_id])
    if status != "done":
        return False
    log.warning("%s: folder %s is missing; its stage %s runs again to rebuild it", describe(row), row["path"],
                stage_run_id)
    why = f"model folder {row['path']} missing (sha256 was {row.get('weights_sha256')}): running again to rebuild it"
    with reg.transaction() as con:
        con.execute("DELETE FROM models WHERE model_id = ?", [stage_run_id])
        con.execute("UPDATE stage_runs SET status = 'failed', error = ? WHERE stage_run_id = ?", [why, stage_run_id])
    return True
