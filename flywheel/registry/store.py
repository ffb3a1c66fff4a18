"""The registry: one DuckDB file that holds every prompt, candidate, judgment, pair and model of every run.

Layout under the registry root (default `data_registry/`):
    flywheel.duckdb        the tables below
    models/<model_id>/     saved models (written to a temp folder, renamed into place, then registered)
    datasets/<name>/       immutable, content-hashed Parquet versions of stage outputs (flywheel/registry/datasets.py)

Keys are content hashes of what determines a row (see `flywheel.config.content_hash`), so a stage that runs again
computes the same keys, finds the rows there, and does nothing. Every data row records what produced it: run,
iteration, model, stage run and config hash. `stage_runs` is the ledger of stages: a stage whose row says 'done' is
skipped; one that says 'running' or 'failed' is resumed, and its per-item keys tell it what is already finished.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import duckdb

from .base import (
    RegistryDamagedError,
    RegistryLockedError,
    RegistryMissingError,
    RegistrySchemaError,
    check_root,
    now,
)
from .lock import is_locked, read_holder

SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key           VARCHAR PRIMARY KEY,
    value         VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id        VARCHAR PRIMARY KEY,
    name          VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    config        JSON NOT NULL,
    status        VARCHAR NOT NULL,            -- running | done | failed
    created_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS iterations (
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,            -- t: M_t -> M_{t+1}
    model_in      VARCHAR NOT NULL,
    model_out     VARCHAR,
    status        VARCHAR NOT NULL,
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ,
    PRIMARY KEY (run_id, iteration)
);
CREATE TABLE IF NOT EXISTS stage_runs (
    stage_run_id  VARCHAR PRIMARY KEY,         -- hash of stage name + inputs + the stage's own config
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    stage         VARCHAR NOT NULL,
    model_id      VARCHAR,
    config_hash   VARCHAR NOT NULL,
    status        VARCHAR NOT NULL,            -- running | done | failed
    stats         JSON,
    error         VARCHAR,
    started_at    TIMESTAMPTZ NOT NULL,
    finished_at   TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS run_stages (          -- which stage runs each run used (a stage may be reused)
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    stage         VARCHAR NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    PRIMARY KEY (run_id, iteration, stage)
);
CREATE TABLE IF NOT EXISTS templates (
    template_hash VARCHAR PRIMARY KEY,
    name          VARCHAR NOT NULL,
    text          VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    model_id      VARCHAR PRIMARY KEY,
    run_id        VARCHAR NOT NULL,
    name          VARCHAR NOT NULL,            -- PT, M1, M2, ...
    kind          VARCHAR NOT NULL,            -- base | sft | dpo | ppo | grpo | rloo | rs-sft
    iteration     INTEGER NOT NULL,
    parent_id     VARCHAR,
    path          VARCHAR NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    metrics       JSON,
    ref_model_id  VARCHAR,                     -- the reference model of DPO/PPO/GRPO/RLOO (KL anchor)
    dataset_version VARCHAR,                   -- the dataset version it was trained on (dataset_versions)
    train_config  JSON,                        -- the trainer's own config section
    created_at    TIMESTAMPTZ NOT NULL,
    weights_sha256 VARCHAR                     -- hash of the weight files (flywheel/registry/integrity.py)
);
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id     VARCHAR PRIMARY KEY,
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,            -- 0 for seeds
    source        VARCHAR NOT NULL,            -- seed | self_instruct | file (self_instruct.prompts_file)
    text          VARCHAR NOT NULL,
    reference     VARCHAR,                     -- the seed's answer, if any
    seed_id       VARCHAR,
    few_shot_ids  VARCHAR[],                   -- prompts shown to the model that wrote this one
    kept          BOOLEAN NOT NULL,
    drop_reason   VARCHAR,                     -- empty | too_short | too_long | banned_keyword | not_instruction
                                               -- | not_a_task | echo | duplicate | near_duplicate
    model_id      VARCHAR,
    stage_run_id  VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS seed_responses (      -- human-written replies to seed prompts, with their human rank
    response_id   VARCHAR PRIMARY KEY,
    prompt_id     VARCHAR NOT NULL,            -- a seed prompt (prompts.source = 'seed')
    text          VARCHAR NOT NULL,
    human_rank    INTEGER,                     -- 0 = best; NULL when the format has no ranking
    stage_run_id  VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS candidates (
    candidate_id  VARCHAR PRIMARY KEY,
    prompt_id     VARCHAR NOT NULL,
    sample_index  INTEGER NOT NULL,
    text          VARCHAR NOT NULL,
    num_tokens    INTEGER NOT NULL,
    finish_reason VARCHAR NOT NULL,            -- stop | length
    model_id      VARCHAR NOT NULL,
    backend       VARCHAR NOT NULL,
    sampling      JSON NOT NULL,
    seed          BIGINT NOT NULL,
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS judgments (
    judgment_id   VARCHAR PRIMARY KEY,
    candidate_id  VARCHAR NOT NULL,
    sample_index  INTEGER NOT NULL,
    raw_text      VARCHAR NOT NULL,
    score         DOUBLE,                      -- NULL when the text held no valid verdict
    parse_error   VARCHAR,                     -- why not (see flywheel.stages.score_parser)
    judge_model_id VARCHAR NOT NULL,
    template_hash VARCHAR NOT NULL,
    sampling      JSON NOT NULL,
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS pairs (
    pair_id       VARCHAR PRIMARY KEY,
    prompt_id     VARCHAR NOT NULL,
    chosen_id     VARCHAR NOT NULL,
    rejected_id   VARCHAR NOT NULL,
    chosen_score  DOUBLE NOT NULL,             -- the combined score pairs were chosen by
    rejected_score DOUBLE NOT NULL,
    signals       JSON NOT NULL,               -- {"weights": {...}, "rho": r, "chosen": {signal: raw}, "rejected": {...}}
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS rewards (
    reward_id     VARCHAR PRIMARY KEY,
    candidate_id  VARCHAR NOT NULL,
    signal        VARCHAR NOT NULL,            -- coherent | the name of a rule reward
    value         DOUBLE,                      -- NULL when it could not be computed (error says why)
    error         VARCHAR,
    details       JSON,                        -- coherent: logp_sft, logp_pt, tokens; rule: what was extracted
    policy_model_id VARCHAR,                   -- coherent: the SFT model
    ref_model_id  VARCHAR,                     -- coherent: the PT model
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (              -- a candidate split into steps (steps.split), by the reward stage
    step_id       VARCHAR PRIMARY KEY,         -- st-hash(stage run, candidate, index)
    candidate_id  VARCHAR NOT NULL,
    step_index    INTEGER NOT NULL,            -- 0, 1, ...
    text          VARCHAR NOT NULL,
    start_char    INTEGER NOT NULL,            -- its span in the candidate's text: text[start_char:end_char]
    end_char      INTEGER NOT NULL,
    prefix_hash   VARCHAR NOT NULL,            -- hash of the texts of steps 0..index-1: equal for candidates of one
                                               -- prompt that share their steps so far (step-wise pairs join on it)
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS step_rewards (       -- one score per step per step signal (their aggregate is in rewards)
    step_reward_id VARCHAR PRIMARY KEY,
    step_id       VARCHAR NOT NULL,
    candidate_id  VARCHAR NOT NULL,
    step_index    INTEGER NOT NULL,
    signal        VARCHAR NOT NULL,            -- step_rule | step_judge
    value         DOUBLE,                      -- NULL when it could not be computed (error says why)
    error         VARCHAR,
    details       JSON,                        -- step_judge: each sample's raw text and verdict
    judge_model_id VARCHAR,                    -- step_judge: M_t
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS dataset_versions (
    version_id    VARCHAR PRIMARY KEY,         -- <name>-<sha256 prefix>: same content, same version
    name          VARCHAR NOT NULL,            -- prompts | candidates | judgments | rewards | pairs | train
    run_id        VARCHAR NOT NULL,            -- the run that first froze it
    iteration     INTEGER NOT NULL,
    stage_run_id  VARCHAR NOT NULL,
    num_rows      BIGINT NOT NULL,
    schema        JSON NOT NULL,
    sha256        VARCHAR NOT NULL,
    path          VARCHAR NOT NULL,
    derived_from  VARCHAR[],                   -- version ids it was made from
    code_hash     VARCHAR NOT NULL,
    config_hash   VARCHAR NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS evals (               -- benchmark results of a model (`flywheel eval ifeval`)
    eval_id       VARCHAR PRIMARY KEY,         -- <benchmark>-hash of (model fingerprint, data sha256, settings)
    benchmark     VARCHAR NOT NULL,            -- ifeval
    model_id      VARCHAR,                     -- the registered model, NULL for a folder given by path
    model_name    VARCHAR,
    model_spec    VARCHAR NOT NULL,            -- what --model said
    model_path    VARCHAR NOT NULL,
    model_fingerprint VARCHAR NOT NULL,        -- weights sha256 + tokenizer and chat template files
    data_path     VARCHAR NOT NULL,
    data_sha256   VARCHAR NOT NULL,
    settings      JSON NOT NULL,               -- decoding, max_new_tokens, backend, checker library version
    metrics       JSON NOT NULL,               -- prompt/instruction-level strict/loose accuracy, per instruction id
    seconds       DOUBLE,
    created_at    TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS eval_items (          -- one row per prompt of an eval
    eval_id       VARCHAR NOT NULL,
    item_index    INTEGER NOT NULL,            -- line order in the data file
    key           VARCHAR NOT NULL,            -- the record's key, as JSON
    prompt        VARCHAR NOT NULL,
    response      VARCHAR NOT NULL,
    num_tokens    INTEGER NOT NULL,
    finish_reason VARCHAR NOT NULL,            -- stop | length
    instruction_ids VARCHAR[] NOT NULL,
    kwargs        JSON NOT NULL,
    follow_strict BOOLEAN[] NOT NULL,          -- per instruction
    follow_loose  BOOLEAN[] NOT NULL,
    all_strict    BOOLEAN NOT NULL,
    all_loose     BOOLEAN NOT NULL,
    errors        VARCHAR[],                   -- checkers that raised (counted as not followed)
    PRIMARY KEY (eval_id, item_index)
);
CREATE TABLE IF NOT EXISTS pair_labels (         -- a person's review of a pair (`flywheel browse`); every label is kept
    label_id      VARCHAR PRIMARY KEY,         -- random (uuid4 hex)
    pair_id       VARCHAR NOT NULL,
    label         VARCHAR NOT NULL,            -- agree | disagree | flag (agree: the chosen text is the better one)
    note          VARCHAR,
    who           VARCHAR NOT NULL,            -- the name given, else the OS user of the browse process
    created_at    TIMESTAMPTZ NOT NULL
);
"""


# How long an open waits while another process holds the file: the run process waits out readers (they hold it for
# a query or a report), readers wait out the run's short writes. FLYWHEEL_REGISTRY_WAIT_S overrides both.
WRITER_WAIT_S = 300.0
READER_WAIT_S = 60.0

log = logging.getLogger("flywheel")


@dataclass
class StageRun:
    """The ledger row of one stage; `done` says it finished earlier and the caller should skip its work."""

    stage_run_id: str
    done: bool
    stats: dict


class Registry:
    """The registry's DuckDB file, opened on demand, plus the few helpers every stage uses.

    DuckDB lets one process write a file, or several read it, never both. So the file is open only while it is used:
    `reg.con` opens it when needed, and `reg.release()` closes it before long work (a batch of generation, a
    training job), so readers get in between. An open that finds the file held waits for it (`wait_s`), with a
    message saying who holds it. Readers pass `read_only=True`: they never write, never block one another, and never
    take the run lock (flywheel/registry/lock.py)."""

    def __init__(self, root: str | Path, read_only: bool = False, wait_s: float | None = None):
        self.root = Path(root)
        self.read_only = read_only
        env = os.environ.get("FLYWHEEL_REGISTRY_WAIT_S")
        self.wait_s = wait_s if wait_s is not None else float(env) if env else (
            READER_WAIT_S if read_only else WRITER_WAIT_S)
        self.path = self.root / "flywheel.duckdb"
        self._con: duckdb.DuckDBPyConnection | None = None
        self._in_transaction = False
        if read_only:
            check_root(self.root, create=False)
            if not self.path.is_file():
                raise RegistryMissingError(f"no registry at {self.root} (no {self.path.name} there); pass --registry DIR")
        else:
            check_root(self.root)
        self._connect()

    # --- plumbing -------------------------------------------------------------------------------------------------
    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The open connection; opens the file (waiting for it if another process holds it) after a `release`."""
        if self._con is None:
            self._connect()
        return self._con

    def release(self) -> None:
        """Close the file until the next use, so other processes can open it (before long work without it)."""
        if self._con is not None and not self._in_transaction:
            self._con.close()
            self._con = None

    def close(self) -> None:
        self.release()

    def _connect(self) -> None:
        deadline, delay, told = time.monotonic() + self.wait_s, 0.05, False
        while True:
            try:
                self._con = duckdb.connect(str(self.path), read_only=self.read_only)
                break
            except duckdb.ConnectionException as e:  # this process has the file open in another mode
                if self.read_only and "different configuration" in str(e):
                    self._con = duckdb.connect(str(self.path))  # read through this process's own connection
                    break
                raise
            except duckdb.Error as e:
                if not _held_elsewhere(e):
                    raise damaged(self, e) from None
                if time.monotonic() >= deadline:
                    raise RegistryLockedError(
                        f"the registry {self.path} is held by {holder_of(self.root, e)} and was not freed within "
                        f"{self.wait_s:.0f} s; try again when it finishes (FLYWHEEL_REGISTRY_WAIT_S sets the wait)"
                    ) from None
                if not told:
                    log.warning("registry %s is held by %s; waiting up to %.0f s", self.path,
                                holder_of(self.root, e), self.wait_s)
                    told = True
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            self._check_schema()
        except BaseException:
            self.release()
            raise

    def _check_schema(self) -> None:
        con = self._con
        if self.read_only:
            has_meta = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
                                   ).fetchall()[0][0]
            found = (con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() or [[None]])[0][0] \
                if has_meta else None
            if found in MIGRATIONS or found == str(SCHEMA_VERSION):
                return  # an older registry reads fine; columns added since read as missing
        else:
            try:
                con.execute(SCHEMA)
            except duckdb.Error as e:
                raise damaged(self, e) from None
            found = (con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() or [[None]])[0][0]
            if found is None:
                found = "1" if con.execute("SELECT count(*) FROM runs").fetchall()[0][0] else str(SCHEMA_VERSION)
                if found == str(SCHEMA_VERSION):
                    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [found])
            while found in MIGRATIONS:  # older versions this flywheel can bring forward in place
                for statement in MIGRATIONS[found]:
                    con.execute(statement)
                found = str(int(found) + 1)
                con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [found])
        if found != str(SCHEMA_VERSION):
            raise RegistrySchemaError(
                f"the registry {self.path} has schema version {found}, this flywheel writes version "
                f"{SCHEMA_VERSION}; move {self.root} aside (or `make clean-registry`) and run again")

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self.con
        con.execute("BEGIN TRANSACTION")
        self._in_transaction = True
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            self._in_transaction = False
        con.execute("COMMIT")

    def rows(self, sql: str, params: list | tuple = ()) -> list[dict]:
        cur = self.con.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def scalar(self, sql: str, params: list | tuple = ()) -> Any:
        rows = self.con.execute(sql, params).fetchall()  # fetchall: DuckDB 2.0 keeps a half-read result open
        return rows[0][0] if rows else None

    def insert(self, table: str, rows: list[dict]) -> int:
        """Insert rows (dicts with the same keys); rows whose primary key exists already are left as they are."""
        if not rows:
            return 0
        cols = list(rows[0])
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) ON CONFLICT DO NOTHING"
        values = [[_to_db(r[c]) for c in cols] for r in rows]
        with self.transaction() as con:
            con.executemany(sql, values)
        return len(rows)

    def insert_many(self, table: str, rows: list[dict]) -> int:
        """`insert` for many rows at once, through one Arrow table (executemany costs milliseconds a row: a stage's
        thousands of step rows took a minute). Same rows, same conflict rule."""
        if not rows:
            return 0
        import pyarrow as pa

        cols = list(rows[0])
        data = pa.table({c: [_to_db(r[c]) for r in rows] for c in cols})
        names = ", ".join(cols)
        with self.transaction() as con:
            con.register("new_rows", data)
            try:
                con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM new_rows ON CONFLICT DO NOTHING")
            finally:
                con.unregister("new_rows")
        return len(rows)

    def existing(self, table: str, key: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        found = self.con.execute(f"SELECT {key} FROM {table} WHERE {key} IN (SELECT unnest(?))", [ids]).fetchall()
        return {r[0] for r in found}

    # --- runs, iterations, stages ---------------------------------------------------------------------------------
    def start_run(self, run_id: str, name: str, config_hash: str, config: dict) -> None:
        self.con.execute(
            "INSERT INTO runs VALUES (?, ?, ?, ?, 'running', ?, NULL) "
            "ON CONFLICT (run_id) DO UPDATE SET status = 'running', finished_at = NULL, "
            "config_hash = excluded.config_hash, config = excluded.config",  # e.g. new monitor thresholds
            [run_id, name, config_hash, json.dumps(config), now()],
        )

    def finish_run(self, run_id: str, status: str = "done") -> None:
        self.con.execute("UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?", [status, now(), run_id])

    def start_iteration(self, run_id: str, iteration: int, model_in: str) -> None:
        self.con.execute(
            "INSERT INTO iterations VALUES (?, ?, ?, NULL, 'running', ?, NULL) "
            "ON CONFLICT (run_id, iteration) DO UPDATE SET status = 'running'",
            [run_id, iteration, model_in, now()],
        )

    def finish_iteration(self, run_id: str, iteration: int, model_out: str) -> None:
        self.con.execute(
            "UPDATE iterations SET model_out = ?, status = 'done', finished_at = ? WHERE run_id = ? AND iteration = ?",
            [model_out, now(), run_id, iteration],
        )

    def begin_stage(
        self, stage_run_id: str, *, run_id: str, iteration: int, stage: str, model_id: str | None, config_hash: str
    ) -> StageRun:
        self.con.execute(
            "INSERT INTO run_stages VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET stage_run_id = excluded.stage_run_id",
            [run_id, iteration, stage, stage_run_id],
        )
        row = self.rows("SELECT status, stats FROM stage_runs WHERE stage_run_id = ?", [stage_run_id])
        if row and row[0]["status"] == "done":
            return StageRun(stage_run_id, True, json.loads(row[0]["stats"] or "{}"))
        self.con.execute(
            "INSERT INTO stage_runs VALUES (?, ?, ?, ?, ?, ?, 'running', NULL, NULL, ?, NULL) "
            "ON CONFLICT (stage_run_id) DO UPDATE SET status = 'running', error = NULL",
            [stage_run_id, run_id, iteration, stage, model_id, config_hash, now()],
        )
        return StageRun(stage_run_id, False, {})

    def end_stage(self, stage_run_id: str, stats: dict) -> None:
        self.con.execute(
            "UPDATE stage_runs SET status = 'done', stats = ?, finished_at = ? WHERE stage_run_id = ?",
            [json.dumps(stats), now(), stage_run_id],
        )

    def fail_stage(self, stage_run_id: str, error: str) -> None:
        self.con.execute(
            "UPDATE stage_runs SET status = 'failed', error = ?, finished_at = ? WHERE stage_run_id = ?",
            [error[:2000], now(), stage_run_id],
        )

    # --- templates and models -------------------------------------------------------------------------------------
    def register_template(self, template_hash: str, name: str, text: str) -> None:
        self.insert("templates", [dict(template_hash=template_hash, name=name, text=text, created_at=now())])

    def model(self, model_id: str) -> dict | None:
        found = self.rows("SELECT * FROM models WHERE model_id = ?", [model_id])
        return found[0] if found else None

    def model_dir(self, model_id: str) -> Path:
        return self.root / "models" / model_id

    def register_model(self, **row: Any) -> None:
        row.setdefault("created_at", now())
        self.insert("models", [row])


def reader(root: str | Path) -> Registry:
    """The registry opened for reading (`report`, `datasets`, `lineage`, `resume --list`, `eval`, `verify`): read-only,
    without the run lock, so it never stops a run; it waits (READER_WAIT_S) while the run writes, and the run waits
    for it in turn. Raises RegistryMissingError when `root` holds no registry."""
    return Registry(root, read_only=True)


# In-place upgrades from an older schema version: the statements that bring it to the next version.
MIGRATIONS: dict[str, list[str]] = {
    "2": ["ALTER TABLE models ADD COLUMN IF NOT EXISTS weights_sha256 VARCHAR"],
}


def _held_elsewhere(e: Exception) -> bool:
    """Whether a failed open means another process holds the file (wait), not that the file is bad (say so)."""
    return "Could not set lock" in str(e) or "Conflicting lock" in str(e)


def holder_of(root: Path, e: Exception | None = None) -> str:
    """Who holds the registry, in words: the run named in the run lock, else the process DuckDB names."""
    holder = read_holder(root) if is_locked(root) else None
    if holder is not None:
        return holder.describe()
    pid = re.search(r"PID (\d+)", str(e or ""))
    return f"a reader (pid {pid.group(1)})" if pid else "another process"


def damaged(reg: "Registry", e: Exception) -> RegistryDamagedError:
    """The error for a registry file that opens badly: what is wrong, and the command that repairs or restores it."""
    text, path = str(e), reg.path
    if isinstance(e, PermissionError) or "Permission denied" in text or "read-only file system" in text.lower():
        return RegistryDamagedError(
            f"the registry {reg.root} is not writable by this user ({text.strip()}). Give it back write access "
            f"(chmod -R u+w {reg.root}), run as its owner, or read it with a reader command (report, datasets, "
            "lineage), which opens it read-only")
    size = path.stat().st_size if path.exists() else -1
    what = ("is empty (0 bytes)" if size == 0 else
            "is truncated (shorter than its own header says)" if "read enough bytes" in text or "truncated" in text
            else "is corrupt" if "Corrupt" in text or "checksum" in text or "not a valid DuckDB" in text
            else "cannot be opened")
    return RegistryDamagedError(
        f"the registry file {path} {what}: {text.strip().splitlines()[0][:300]}. Move it aside and restore it "
        f"from a backup: mv {path} {path}.damaged && cp BACKUP/flywheel.duckdb {path}. The frozen dataset versions "
        f"under {reg.root / 'datasets'} and the models under {reg.root / 'models'} are untouched by this")


def _to_db(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return os.fspath(value)
    return value
