"""Compare a registry with another, table by table and weight by weight: is a resumed run the run that was never
interrupted? Used by tests/test_kill_resume.py and bench/kill_harness.py.

    found = differences(resumed_root, reference_root)   # [] when they hold the same run
    check_registry(ref)                                  # the same, as assertions (ref.work vs ref.snapshots/final)

Both registries must live (or have lived) at the same path, so model paths and configs match: the reference is a
copy of a registry taken at that path. What counts as a difference:

- table: a table's rows, less the VOLATILE columns, differ (rows only in one of the two, counted by primary key);
- duplicate-key: two rows of one table share a primary key;
- model-folder: a registered model's folder is a temp folder, or lacks config.json, model.safetensors or
  tokenizer.json;
- weights: a model's model.safetensors differs from the reference's byte for byte;
- dataset-file: a dataset version's Parquet file is missing, or its content's sha256 is not the one registered;
- report: the run's report.md is in one registry and not the other.

`leftovers(root)` lists temp files a killed process left (half-written model folders, `.tmp-*` dataset files): not a
difference in the data, reported apart.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from flywheel.registry import Registry

# Timestamps, timings, and the hash of the flywheel source a process ran (a fork's stages run in another process; in a
# working tree being edited, its code may differ from the reference's: that is not a difference in the data).
VOLATILE = {"created_at", "started_at", "finished_at", "stats", "metrics", "code_hash"}
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclass(frozen=True)
class Difference:
    kind: str    # table | duplicate-key | model-folder | weights | dataset-file | report
    where: str   # the table, model id or dataset version
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.where}: {self.detail}"


def primary_keys(reg: Registry) -> dict[str, list[str]]:
    rows = reg.rows("SELECT table_name, constraint_column_names AS cols FROM duckdb_constraints() "
                    "WHERE constraint_type = 'PRIMARY KEY' ORDER BY table_name")
    return {r["table_name"]: list(r["cols"]) for r in rows}


def contents(root: Path) -> dict[str, list[tuple]]:
    """Every table's rows (less volatile columns), ordered by its primary key."""
    return {table: rows for table, (_, rows) in _contents(root).items()}


def _contents(root: Path) -> dict[str, tuple[list[str], list[tuple]]]:
    """{table: (columns, rows)}: the columns less volatile ones, primary key first; the rows ordered by that key."""
    with Registry(root) as reg:
        out = {}
        for table, key in primary_keys(reg).items():
            cols = [c[0] for c in reg.con.execute(f"SELECT * FROM {table} LIMIT 0").description
                    if c[0] not in VOLATILE and c[0] not in key]
            cols = [*key, *cols]
            out[table] = (cols, reg.con.execute(f"SELECT {', '.join(cols)} FROM {table} "
                                                f"ORDER BY {', '.join(key)}").fetchall())
    return out


def _frozen(value):
    """A row or value made hashable (DuckDB returns lists for LIST columns and dicts for STRUCTs)."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def _table_differences(table: str, key_width: int, cols: list[str], got: list[tuple],
                       want: list[tuple]) -> list[Difference]:
    if got == want:
        return []
    g, w = {_frozen(r) for r in got}, {_frozen(r) for r in want}
    only_got, only_want = sorted(g - w, key=repr), sorted(w - g, key=repr)
    got_keys, want_keys = {r[:key_width] for r in only_got}, {r[:key_width] for r in only_want}
    changed = sorted(got_keys & want_keys, key=repr)
    extra, missing = sorted(got_keys - want_keys, key=repr), sorted(want_keys - got_keys, key=repr)
    out = []
    for k in changed[:3]:
        a = next(r for r in only_got if r[:key_width] == k)
        b = next(r for r in only_want if r[:key_width] == k)
        cells = [(cols[i], x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y]
        out.append(Difference("table", table, f"row {k} differs: (column, resumed, reference) {cells[:3]}"))
    if len(changed) > 3:
        out.append(Difference("table", table, f"{len(changed) - 3} more rows differ"))
    if extra:
        out.append(Difference("table", table, f"{len(extra)} rows not in the reference, keys {extra[:3]}"))
    if missing:
        out.append(Difference("table", table, f"{len(missing)} rows of the reference missing, keys {missing[:3]}"))
    if not out:  # same distinct rows, different multiplicity (a duplicate row)
        out.append(Difference("table", table, f"{len(got)} rows, the reference has {len(want)}"))
    return out


def differences(got_root: Path, want_root: Path) -> list[Difference]:
    """Everything in which the registry at `got_root` differs from the one at `want_root` (see the module's doc).
    `got_root` is the registry at the path the runs used (its rows name model folders there); `want_root` may be a
    copy of one, anywhere."""
    got_root, want_root = Path(got_root), Path(want_root)
    got, want = _contents(got_root), _contents(want_root)
    found: list[Difference] = []
    for table in sorted(set(got) ^ set(want)):
        found.append(Difference("table", table, "only in " + ("the resumed run" if table in got else "the reference")))
    with Registry(got_root) as reg:
        keys = primary_keys(reg)
        for table in sorted(set(got) & set(want)):
            (cols, got_rows), (want_cols, want_rows) = got[table], want[table]
            if cols != want_cols:
                found.append(Difference("table", table, f"columns {cols}, the reference has {want_cols}"))
            else:
                found += _table_differences(table, len(keys[table]), cols, got_rows, want_rows)
        for table, key in keys.items():
            sql = f"SELECT count(*), count(DISTINCT ({', '.join(key)})) FROM {table}"
            n, distinct = reg.con.execute(sql).fetchone()
            if n != distinct:
                found.append(Difference("duplicate-key", table, f"{n} rows, {distinct} distinct keys"))
        models = reg.rows("SELECT model_id, path FROM models ORDER BY model_id")
        versions = reg.rows("SELECT version_id, path, sha256 FROM dataset_versions ORDER BY version_id")
        runs = [r["run_id"] for r in reg.rows("SELECT run_id FROM runs ORDER BY run_id")]
    for m in models:
        folder = Path(m["path"])
        if folder.name.startswith("."):
            found.append(Difference("model-folder", m["model_id"], f"registered at a temp folder {folder}"))
        missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
        if missing:
            found.append(Difference("model-folder", m["model_id"], f"{', '.join(missing)} missing in {folder}"))
            continue
        try:
            twin = want_root / folder.relative_to(got_root)
        except ValueError:
            twin = folder  # a model outside the registry (a base given by path): the same folder for both
        if not (twin / "model.safetensors").is_file() or \
                _sha256(folder / "model.safetensors") != _sha256(twin / "model.safetensors"):
            found.append(Difference("weights", m["model_id"], f"{folder / 'model.safetensors'} differs from {twin}"))
    from flywheel.registry.datasets import file_content_sha256

    for v in versions:
        path = got_root / v["path"]
        if not path.is_file():
            found.append(Difference("dataset-file", v["version_id"], f"{path} missing"))
        elif file_content_sha256(path)[0] != v["sha256"]:
            found.append(Difference("dataset-file", v["version_id"], f"{path}: content does not hash to {v['sha256']}"))
    for run_id in runs:
        here, there = (root / "runs" / run_id / "report.md" for root in (got_root, want_root))
        if here.is_file() != there.is_file():
            found.append(Difference("report", run_id, f"report.md {'only' if here.is_file() else 'not'} written "
                                                      "in the resumed run"))
    return found


def leftovers(root: Path) -> list[str]:
    """Temp files and folders a killed process left in the registry (relative paths): `.`-named model folders and
    `.tmp-*` dataset files. Harmless to the data; a resumed run does not clean them."""
    root = Path(root)
    found = [p for p in (root / "models").glob(".*") if p.is_dir()] if (root / "models").is_dir() else []
    found += list((root / "datasets").rglob(".tmp-*")) if (root / "datasets").is_dir() else []
    return sorted(str(p.relative_to(root)) for p in found)


def check_registry(ref) -> None:
    """The resumed registry `ref.work` equals the reference `ref.snapshots / "final"`: same rows, same model weights,
    no duplicate keys, no model row pointing at a missing or partial folder, every dataset version intact."""
    found = differences(ref.work, ref.snapshots / "final")
    assert not found, "the resumed run differs from the uninterrupted run:\n" + "\n".join(map(str, found[:10]))
    with Registry(ref.work) as reg:
        models = reg.rows("SELECT model_id, path FROM models")
    assert {m["model_id"].split("-")[0] for m in models} == {"base", "sft", "dpo"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows(root: Path, table: str) -> dict[str, tuple]:
    with Registry(root) as reg:
        key = primary_keys(reg)[table][0]
        return {r[0]: r for r in reg.con.execute(f"SELECT {key}, * EXCLUDE (created_at) FROM {table}").fetchall()}


def _ledger(root: Path) -> dict[str, str]:
    with Registry(root) as reg:
        return {r["stage"]: r["status"] for r in reg.rows("SELECT stage, status FROM stage_runs")}
