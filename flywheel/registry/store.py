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
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import duckdb

SCHEMA_VERSION = 2

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
    created_at    TIMESTAMPTZ NOT NULL
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
"""


class RegistrySchemaError(RuntimeError):
    """The registry file was written by a flywheel with another schema."""


def now() -> datetime:
    return datetime.now(timezone.utc)


class RegistryLockedError(RuntimeError):
    """Another process holds the registry's DuckDB file."""


@dataclass
class StageRun:
    """The ledger row of one stage; `done` says it finished earlier and the caller should skip its work."""

    stage_run_id: str
    done: bool
    stats: dict


class Registry:
    """A DuckDB connection to the registry file, plus the few helpers every stage uses."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "flywheel.duckdb"
        try:
            self.con = duckdb.connect(str(self.path))
        except duckdb.IOException as e:  # DuckDB allows one writing process per file
            raise RegistryLockedError(
                f"the registry {self.path} is in use by another process ({e}); wait for it to finish"
            ) from None
        self.con.execute(SCHEMA)
        found = self.scalar("SELECT value FROM meta WHERE key = 'schema_version'")
        if found is None:
            if self.scalar("SELECT count(*) FROM runs"):
                found = "1"  # written before the schema was versioned
            else:
                self.con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
                found = str(SCHEMA_VERSION)
        if found != str(SCHEMA_VERSION):
            self.con.close()
            raise RegistrySchemaError(
                f"the registry {self.path} has schema version {found}, this flywheel writes version "
                f"{SCHEMA_VERSION}; move {self.root} aside (or `make clean-registry`) and run again")

    # --- plumbing -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

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


def _to_db(value: Any) -> Any:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, Path):
        return os.fspath(value)
    return value
