"""Versioned datasets: every stage's output frozen as an immutable, content-addressed Parquet file with a manifest row.

After a stage's work succeeds, `run_stage` calls `freeze_stage_outputs`, which writes each dataset the stage produced

    seeds -> seeds    self_instruct -> prompts    generate -> candidates    judge -> judgments
    reward -> rewards    pairs -> pairs + train (TRL's preference format: prompt, chosen, rejected, plus ids)
    meta_judge -> judge_pairs (the same format: the judge prompt, the preferred and the other judgment, plus ids)

to `<registry>/datasets/<name>/<version_id>.parquet` and records it in `dataset_versions`. The version id is the
name plus a prefix of the content hash: the sha256 of the rows' canonical JSON (DuckDB `to_json` of each row, in key
order, concatenated), computed from the written file, or, when the stage left its rows ready (`prepared_rows`, the
pairs stage does) and every column reads back from Parquet unchanged, from those rows as they are written: the same
hash, without a second pass over the file. Volatile columns (created_at, run_id, the run's config hash)
are left out, so freezing the same rows again gives the same version and no new row. `derived_from` lists the
versions of the stages named in the stage's inputs; `code_hash` is the hash of the flywheel package's source (every
`flywheel/**/*.py`), so a version records the exact code that first froze it.

    table = read_version(reg, "train-3f2a...")       # pyarrow.Table; refuses a missing, unreadable or altered file
    stage_version(reg, pairs_sid, "train")           # the version a stage run froze (e.g. what DPO should read)
    restore_version(reg, "train-3f2a...")            # rewrite a lost or damaged file from the registry rows
    list_versions(reg, run="demo-...", name="pairs")
    diff_pairs(reg, "train-aaa...", "train-bbb...")   # added / removed / changed pairs, keyed by prompt text
    export_version(reg, "train-3f2a...", "out/", format="hf")   # a `datasets.load_from_disk` folder
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import content_hash
from .base import dead_leftovers
from .store import Registry, now

# Which datasets each stage produces (stages not listed, such as base, sft and the trainers, produce none).
STAGE_DATASETS: dict[str, tuple[str, ...]] = {
    "seeds": ("seeds",), "self_instruct": ("prompts",), "generate": ("candidates",), "judge": ("judgments",),
    "reward": ("rewards",), "rewards": ("rewards",), "pairs": ("pairs", "train"), "meta_judge": ("judge_pairs",),
}

# The rows of each dataset for one stage run ($sid), in a deterministic order, without volatile columns.
DATASET_SQL: dict[str, str] = {
    "seeds": """
        SELECT p.prompt_id, p.text, p.reference, p.seed_id, r.responses
        FROM prompts p LEFT JOIN (
            SELECT prompt_id, list({'response_id': response_id, 'text': text, 'human_rank': human_rank}
                                   ORDER BY human_rank NULLS LAST, response_id) AS responses
            FROM seed_responses GROUP BY prompt_id) r USING (prompt_id)
        WHERE p.stage_run_id = $sid ORDER BY p.prompt_id""",
    "prompts": """
        SELECT prompt_id, iteration, source, text, reference, seed_id, few_shot_ids, kept, drop_reason, model_id
        FROM prompts WHERE stage_run_id = $sid ORDER BY prompt_id""",
    "candidates": """
        SELECT candidate_id, prompt_id, sample_index, text, num_tokens, finish_reason, model_id, backend,
               sampling::VARCHAR AS sampling, seed, iteration
        FROM candidates WHERE stage_run_id = $sid ORDER BY candidate_id""",
    "judgments": """
        SELECT judgment_id, candidate_id, sample_index, raw_text, score, parse_error, judge_model_id, template_hash,
               sampling::VARCHAR AS sampling, iteration
        FROM judgments WHERE stage_run_id = $sid ORDER BY judgment_id""",
    "rewards": """
        SELECT reward_id, candidate_id, signal, value, error, details::VARCHAR AS details, policy_model_id,
               ref_model_id, iteration
        FROM rewards WHERE stage_run_id = $sid ORDER BY reward_id""",
    "pairs": """
        SELECT pair_id, prompt_id, chosen_id, rejected_id, chosen_score, rejected_score, signals::VARCHAR AS signals,
               iteration
        FROM pairs WHERE stage_run_id = $sid ORDER BY pair_id""",
    "train": """
        SELECT p.text AS prompt, ch.text AS chosen, rj.text AS rejected,
               pr.pair_id, pr.prompt_id, pr.chosen_id, pr.rejected_id, pr.chosen_score, pr.rejected_score
        FROM pairs pr
        JOIN prompts p ON p.prompt_id = pr.prompt_id
        JOIN candidates ch ON ch.candidate_id = pr.chosen_id
        JOIN candidates rj ON rj.candidate_id = pr.rejected_id
        WHERE pr.stage_run_id = $sid ORDER BY pr.pair_id""",
    # The meta-judge's pairs of judgments (flywheel/stages/meta_judge.py): a candidate whose two verdicts (rows of
    # its stage, sample_index 0: the higher-scored judgment shown as A, 1: as B; score 1 = it preferred the
    # higher-scored one) agree. The prompt is the judge's template filled as `str.format` does (the tokens {{, }},
    # {instruction}, {response}), so it is exactly what the judge saw.
    "judge_pairs": """
        WITH m AS (
            SELECT candidate_id, min(score) = 1 AS higher_better,
                   arg_min(json_extract_string(sampling, '$.shown[0]'), sample_index) AS higher_id,
                   arg_min(json_extract_string(sampling, '$.shown[1]'), sample_index) AS lower_id,
                   arg_min(raw_text, sample_index) AS verdict_ab, arg_max(raw_text, sample_index) AS verdict_ba
            FROM judgments WHERE stage_run_id = $sid
            GROUP BY candidate_id HAVING count(score) = 2 AND min(score) = max(score))
        SELECT array_to_string(list_transform(
                   regexp_extract_all(t.text, '\\{\\{|\\}\\}|\\{instruction\\}|\\{response\\}|[^{}]+'),
                   lambda x: CASE x WHEN '{{' THEN '{' WHEN '}}' THEN '}' WHEN '{instruction}' THEN p.text
                                    WHEN '{response}' THEN c.text ELSE x END), '') AS prompt,
               ch.raw_text AS chosen, rj.raw_text AS rejected, m.candidate_id,
               ch.judgment_id AS chosen_judgment_id, rj.judgment_id AS rejected_judgment_id,
               ch.score AS chosen_score, rj.score AS rejected_score, m.verdict_ab, m.verdict_ba
        FROM m
        JOIN judgments ch ON ch.judgment_id = if(m.higher_better, m.higher_id, m.lower_id)
        JOIN judgments rj ON rj.judgment_id = if(m.higher_better, m.lower_id, m.higher_id)
        JOIN candidates c ON c.candidate_id = m.candidate_id
        JOIN prompts p ON p.prompt_id = c.prompt_id
        JOIN templates t ON t.template_hash = ch.template_hash
        ORDER BY m.candidate_id""",
}

# Joins a "pairs" table (registered as `pairs_version`) to its texts: the training set's columns.
PREFERENCE_SQL = """
SELECT p.text AS prompt, ch.text AS chosen, rj.text AS rejected,
       v.pair_id, v.prompt_id, v.chosen_id, v.rejected_id, v.chosen_score, v.rejected_score
FROM pairs_version v
JOIN prompts p ON p.prompt_id = v.prompt_id
JOIN candidates ch ON ch.candidate_id = v.chosen_id
JOIN candidates rj ON rj.candidate_id = v.rejected_id
ORDER BY v.pair_id
"""

# zstd level 1: about a third faster to write than DuckDB's default level and, on text columns, no larger. The level
# changes the file's bytes, never its content, so version ids (content hashes) do not depend on it.
PARQUET_OPTIONS = "FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1"
_STAGE_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]+-[0-9a-f]{16}$")
HASH_BATCH_ROWS = 100_000


class DatasetError(ValueError):
    """A dataset version cannot be used as asked (unknown id, wrong kind of dataset, bad output folder)."""


class DatasetIntegrityError(DatasetError):
    """A version's Parquet file is missing, unreadable, or no longer holds the rows it was frozen with."""


# --- hashing ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def code_hash() -> str:
    """Hash of the flywheel package's source: every .py file under flywheel/, by relative path and content."""
    root = Path(__file__).resolve().parent
    files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    return content_hash([[p.relative_to(root).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()] for p in files])


def file_content_sha256(path: Path) -> tuple[str, int]:
    """(sha256, rows) of a Parquet file's content: each row's canonical JSON, in file order, concatenated.
    Streams the file through an in-memory DuckDB, so memory stays flat however large the file is."""
    con = duckdb.connect()
    try:
        con.execute("SET enable_progress_bar = false")
        return _json_rows_sha256(con.sql("SELECT to_json(t)::VARCHAR AS j FROM read_parquet($path) t",
                                         params={"path": str(path)}))
    finally:
        con.close()


def _json_rows_sha256(rel: duckdb.DuckDBPyRelation) -> tuple[str, int]:
    """(sha256, rows) of a one-column relation of JSON strings, streamed in batches, in order."""
    h = hashlib.sha256()
    rows = 0
    for batch in rel.to_arrow_reader(HASH_BATCH_ROWS):
        _update_with_strings(h, batch.column(0))
        rows += batch.num_rows
    return h.hexdigest(), rows


def _update_with_strings(h, arr: pa.Array) -> None:
    """Feed the concatenated values of a string array to h, straight from its data buffer (no Python strings)."""
    if len(arr) == 0:
        return
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        width = np.int32 if pa.types.is_string(arr.type) else np.int64
        offsets = np.frombuffer(arr.buffers()[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1]
        h.update(memoryview(arr.buffers()[2])[int(offsets[0]) : int(offsets[-1])])
    else:  # e.g. string_view
        for value in arr.to_pylist():
            h.update(value.encode())


# --- freezing --------------------------------------------------------------------------------------------------------
def dataset_path(reg: Registry, name: str, version_id: str) -> Path:
    return reg.root / "datasets" / name / f"{version_id}.parquet"


def _sql_path(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def prepared_rows(stage_run_id: str) -> str:
    """The temp table (a quoted name) in which a stage's work may leave the rows of the datasets the stage produces,
    in the order their DATASET_SQL gives them, with a column of the same name for each dataset column (others are
    ignored). `freeze_stage_outputs` then writes and hashes those rows instead of querying the registry again, and
    drops the table. The pairs stage does: it has just joined its pairs to their texts. The rows must be exactly those
    DATASET_SQL gives (`restore_version` rebuilds a version from it), and the version id is the same either way."""
    return '"' + f"stage_rows:{stage_run_id}".replace('"', '""') + '"'


# Column types whose to_json is the same read back from Parquet as in the table written: rows of only these types are
# hashed as they are written, not read back from the file (a second pass over it, decompressing every value).
_ROUND_TRIP_TYPES = {"VARCHAR", "DOUBLE", "INTEGER", "BIGINT", "BOOLEAN"}


def _prepared_select(reg: Registry, name: str, stage_run_id: str, rows: str) -> tuple[str, bool]:
    """(SELECT of dataset `name`'s columns from the prepared table `rows`, cast to the types DATASET_SQL gives,
    whether every column's type reads back from Parquet as it was written)."""
    rel = reg.con.sql(DATASET_SQL[name], params={"sid": stage_run_id})  # bound, not run: its columns and types
    cols = [(c, str(t)) for c, t in zip(rel.columns, rel.types)]
    select = ", ".join(f'CAST("{c}" AS {t}) AS "{c}"' for c, t in cols)
    return f"SELECT {select} FROM {rows}", all(t in _ROUND_TRIP_TYPES for _, t in cols)


def freeze_dataset(reg: Registry, name: str, stage_run_id: str, *, run_id: str, iteration: int,
                   derived_from: list[str], config_hash: str, rows: str | None = None) -> str:
    """Freeze one dataset of stage run `stage_run_id` and return its version id (an existing one if the same rows
    were frozen before; a missing file of that version is put back). `rows`: a `prepared_rows` table to write the
    rows from, instead of DATASET_SQL."""
    if name not in DATASET_SQL:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(DATASET_SQL)}")
    folder = reg.root / "datasets" / name
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{stage_run_id}-{os.getpid()}.parquet"
    for left in dead_leftovers(folder, f".tmp-{stage_run_id}-*.parquet"):  # a killed earlier attempt's
        left.unlink()
    try:
        if rows is None:
            source, params, hash_as_written = DATASET_SQL[name], {"sid": stage_run_id}, False
        else:
            (source, hash_as_written), params = _prepared_select(reg, name, stage_run_id, rows), None
        reg.con.execute(f"COPY ({source}) TO {_sql_path(tmp)} ({PARQUET_OPTIONS})", params)
        if hash_as_written:  # the rows just written, in the same order: the hash the file gives, without reading it
            sha, num_rows = _json_rows_sha256(reg.con.sql(f"SELECT to_json(t)::VARCHAR AS j FROM ({source}) t"))
        else:
            sha, num_rows = file_content_sha256(tmp)
        version_id = f"{name}-{sha[:16]}"
        known = reg.rows("SELECT path FROM dataset_versions WHERE version_id = ?", [version_id])
        path = reg.root / known[0]["path"] if known else dataset_path(reg, name, version_id)
        if _intact(path, sha):
            tmp.unlink()
        else:  # new, or a missing or damaged file of a known version: the rows just written are those it held
            os.replace(tmp, path)  # readers see no file or the whole file, never half of one
        if not known:
            schema = [{"name": f.name, "type": str(f.type)} for f in pq.read_schema(path)]
            reg.insert("dataset_versions", [dict(
                version_id=version_id, name=name, run_id=run_id, iteration=iteration, stage_run_id=stage_run_id,
                num_rows=num_rows, schema=json.dumps(schema), sha256=sha,
                path=path.relative_to(reg.root).as_posix(), derived_from=sorted(set(derived_from)),
                code_hash=code_hash(), config_hash=config_hash, created_at=now())])
    finally:
        tmp.unlink(missing_ok=True)
    return version_id


def _intact(path: Path, sha: str) -> bool:
    if not path.is_file():
        return False
    try:
        return file_content_sha256(path)[0] == sha
    except (duckdb.Error, OSError):
        return False


def restore_version(reg: Registry, version_id: str) -> Path:
    """Write a version's file again from the registry rows of the stage run that froze it (after the file was lost
    or damaged). Refuses if those rows no longer give the same content."""
    row = version(reg, version_id)
    again = freeze_dataset(reg, row["name"], row["stage_run_id"], run_id=row["run_id"], iteration=row["iteration"],
                           derived_from=row["derived_from"] or [], config_hash=row["config_hash"])
    if again != version_id:
        raise DatasetIntegrityError(
            f"cannot restore {version_id}: the registry rows of stage run {row['stage_run_id']} now give {again}")
    return reg.root / row["path"]


def _stage_run_ids(value: Any) -> Iterable[str]:
    """Every string in a stage's inputs (recursively) that has the shape of a stage run id."""
    if isinstance(value, str):
        if _STAGE_RUN_ID.match(value):
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _stage_run_ids(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _stage_run_ids(v)


def stage_versions(reg: Registry, stage_run_ids: list[str]) -> dict[str, dict[str, str]]:
    """stage run id -> {dataset name: version id}: what each stage froze (its ledger stats, then the manifest)."""
    if not stage_run_ids:
        return {}
    found: dict[str, dict[str, str]] = {}
    for r in reg.rows("SELECT stage_run_id, stats FROM stage_runs WHERE stage_run_id IN (SELECT unnest(?))",
                      [stage_run_ids]):
        found.setdefault(r["stage_run_id"], {}).update(json.loads(r["stats"] or "{}").get("dataset_versions", {}))
    for r in reg.rows("SELECT stage_run_id, name, arg_max(version_id, created_at) AS v FROM dataset_versions "
                      "WHERE stage_run_id IN (SELECT unnest(?)) GROUP BY ALL", [stage_run_ids]):
        found.setdefault(r["stage_run_id"], {}).setdefault(r["name"], r["v"])
    return found


def stage_version(reg: Registry, stage_run_id: str, name: str) -> str:
    """The version of dataset `name` that stage run `stage_run_id` froze, e.g. a pairs stage's "train";
    DatasetError if it froze none (a stage finished before datasets were versioned)."""
    found = stage_versions(reg, [stage_run_id]).get(stage_run_id, {}).get(name)
    if found is None:
        raise DatasetError(f"stage run {stage_run_id} has no frozen {name!r} dataset")
    return found


def freeze_stage_outputs(reg: Registry, stage: str, stage_run_id: str, *, run_id: str, iteration: int,
                         inputs: dict, config_hash: str) -> dict[str, str]:
    """Freeze every dataset `stage` produces; returns {dataset name: version id} ({} for stages with none)."""
    names = STAGE_DATASETS.get(stage, ())
    if not names:
        return {}
    upstream_sids = sorted(set(_stage_run_ids(inputs)) - {stage_run_id})
    upstream = sorted({v for versions in stage_versions(reg, upstream_sids).values() for v in versions.values()})
    rows = prepared_rows(stage_run_id)
    prepared = reg.scalar("SELECT count(*) FROM duckdb_tables() WHERE temporary AND table_name = ?",
                          [rows[1:-1].replace('""', '"')]) > 0
    out: dict[str, str] = {}
    try:
        for name in names:
            derived = [out["pairs"]] if name == "train" else upstream  # the training set is the pairs, with texts
            out[name] = freeze_dataset(reg, name, stage_run_id, run_id=run_id, iteration=iteration,
                                       derived_from=derived, config_hash=config_hash,
                                       rows=rows if prepared else None)
    finally:
        if prepared:
            reg.con.execute(f"DROP TABLE IF EXISTS {rows}")
    return out


# --- reading ---------------------------------------------------------------------------------------------------------
def version(reg: Registry, version_id: str) -> dict:
    """The manifest row of a version (schema parsed); DatasetError if there is none."""
    found = reg.rows("SELECT * FROM dataset_versions WHERE version_id = ?", [version_id])
    if not found:
        raise DatasetError(f"no dataset version {version_id!r} in {reg.path} (see `flywheel datasets list`)")
    row = found[0]
    row["schema"] = json.loads(row["schema"])
    return row


def read_version(reg: Registry, version_id: str) -> pa.Table:
    """The rows of a version, after checking that its file still holds exactly the rows it was frozen with."""
    row = version(reg, version_id)
    path = reg.root / row["path"]
    if not path.is_file():
        raise DatasetIntegrityError(f"dataset file {path} (version {version_id}) is missing; "
                                    f"`flywheel datasets restore {version_id}` rewrites it from the registry")
    try:
        sha, num_rows = file_content_sha256(path)
        table = pq.read_table(path)
    except (duckdb.Error, pa.ArrowException, OSError) as e:
        raise DatasetIntegrityError(f"dataset file {path} (version {version_id}) cannot be read: {e}; "
                                    f"`flywheel datasets restore {version_id}` rewrites it from the registry") from None
    if sha != row["sha256"] or num_rows != row["num_rows"] or table.num_rows != num_rows:
        raise DatasetIntegrityError(
            f"dataset file {path} (version {version_id}) was altered: it holds {num_rows} rows with content hash "
            f"{sha[:16]}..., the manifest records {row['num_rows']} rows with {row['sha256'][:16]}...; "
            f"`flywheel datasets restore {version_id}` rewrites it from the registry")
    return table


def list_versions(reg: Registry, run: str | None = None, name: str | None = None) -> list[dict]:
    """Manifest rows (with the producing stage), optionally only those a run used and/or of one dataset name."""
    return reg.rows(
        """SELECT v.version_id, v.name, v.run_id, v.iteration, s.stage, v.stage_run_id, s.model_id, v.num_rows,
                  v.sha256, v.path, v.derived_from, v.code_hash, v.config_hash, v.created_at
           FROM dataset_versions v LEFT JOIN stage_runs s USING (stage_run_id)
           WHERE ($name IS NULL OR v.name = $name)
             AND ($run IS NULL OR v.run_id = $run
                  OR v.stage_run_id IN (SELECT stage_run_id FROM run_stages WHERE run_id = $run))
           ORDER BY v.iteration, v.created_at, v.name""",
        {"run": run, "name": name})


def run_iteration_version(reg: Registry, run: str, iteration: int, name: str = "train") -> str:
    """The version of dataset `name` that run `run` used in `iteration` (e.g. its training pairs)."""
    stage = next((s for s, names in STAGE_DATASETS.items() if name in names), None)
    sid = reg.scalar("SELECT stage_run_id FROM run_stages WHERE run_id = ? AND iteration = ? AND stage = ?",
                     [run, iteration, stage])
    found = stage_versions(reg, [sid]).get(sid, {}).get(name) if sid else None
    if found is None:
        raise DatasetError(f"run {run!r} has no {name!r} dataset in iteration {iteration}")
    return found


def preference_table(reg: Registry, version_id: str) -> pa.Table:
    """A pairs or train version in TRL's preference format: prompt, chosen, rejected, then ids and scores."""
    row = version(reg, version_id)
    table = read_version(reg, version_id)
    if row["name"] == "train":
        return table
    if row["name"] != "pairs":
        raise DatasetError(f"version {version_id} is a {row['name']!r} dataset, not pairs or train")
    reg.con.register("pairs_version", table)
    try:
        return reg.con.sql(PREFERENCE_SQL).to_arrow_table()
    finally:
        reg.con.unregister("pairs_version")


# --- comparing and exporting -----------------------------------------------------------------------------------------
_DIFF_SQL = """
WITH a AS (SELECT * FROM diff_a QUALIFY row_number() OVER (PARTITION BY prompt ORDER BY pair_id) = 1),
     b AS (SELECT * FROM diff_b QUALIFY row_number() OVER (PARTITION BY prompt ORDER BY pair_id) = 1)
SELECT coalesce(a.prompt, b.prompt) AS prompt,
       a.pair_id AS a_pair_id, a.chosen AS a_chosen, a.rejected AS a_rejected,
       a.chosen_score AS a_chosen_score, a.rejected_score AS a_rejected_score,
       b.pair_id AS b_pair_id, b.chosen AS b_chosen, b.rejected AS b_rejected,
       b.chosen_score AS b_chosen_score, b.rejected_score AS b_rejected_score
FROM a FULL OUTER JOIN b ON a.prompt = b.prompt
ORDER BY prompt
"""
_PAIR_FIELDS = ("chosen", "rejected", "chosen_score", "rejected_score")


def diff_pairs(reg: Registry, a: str, b: str) -> dict:
    """Compare two pair sets (pairs or train versions). Two pairs are the same pair when they have the same prompt
    text; a pair is changed when its chosen or rejected text or either score differs.
    Returns {"a", "b", "added": [pair], "removed": [pair], "changed": [{prompt, fields, a, b}], "unchanged": n}."""
    con = duckdb.connect()
    try:
        con.register("diff_a", preference_table(reg, a))
        con.register("diff_b", preference_table(reg, b))
        cur = con.execute(_DIFF_SQL)
        cols = [d[0] for d in cur.description]
        rows = cur.fetchall()
    finally:
        con.close()
    out: dict = {"a": a, "b": b, "added": [], "removed": [], "changed": [], "unchanged": 0}
    for values in rows:
        r = dict(zip(cols, values))
        side = {s: {"pair_id": r[f"{s}_pair_id"], **{f: r[f"{s}_{f}"] for f in _PAIR_FIELDS}} for s in "ab"}
        if r["a_pair_id"] is None:
            out["added"].append({"prompt": r["prompt"], **side["b"]})
        elif r["b_pair_id"] is None:
            out["removed"].append({"prompt": r["prompt"], **side["a"]})
        else:
            fields = [f for f in _PAIR_FIELDS if side["a"][f] != side["b"][f]]
            if fields:
                out["changed"].append({"prompt": r["prompt"], "fields": fields, "a": side["a"], "b": side["b"]})
            else:
                out["unchanged"] += 1
    return out


def export_version(reg: Registry, version_id: str, out: str | Path, format: str = "hf") -> Path:
    """Write a verified version to `out`: a Hugging Face `datasets` folder (format "hf", load it with
    `datasets.load_from_disk(out)`) or `<out>/<version_id>.parquet` ("parquet"). Pairs and train versions are
    written in TRL's preference format (prompt, chosen, rejected, then ids and scores). Returns what was written."""
    if format not in ("hf", "parquet"):
        raise DatasetError(f"format must be 'hf' or 'parquet', got {format!r}")
    row = version(reg, version_id)
    table = preference_table(reg, version_id) if row["name"] in ("pairs", "train") else read_version(reg, version_id)
    out = Path(out)
    if format == "parquet":
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{version_id}.parquet"
        pq.write_table(table, path, compression="zstd")
        return path
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"--out {out} exists and is not empty; choose a new folder")
    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable

    info = DatasetInfo(description=json.dumps({"flywheel_version": version_id, "sha256": row["sha256"],
                                               "derived_from": row["derived_from"]}))
    Dataset(InMemoryTable(table), info=info).save_to_disk(str(out))  # built in memory: nothing under HF_HOME
    return out
