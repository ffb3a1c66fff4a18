"""Pairs: per prompt, chosen = the best-scored candidate and rejected = the worst, in SQL.

A candidate's signals are the mean of its valid judge samples (parse failures excluded) and, when a reward stage ran,
its coherent and rule rewards. With one signal weighted (the default: the judge), the score is that signal as it is.
With several, each is z-scored within its prompt and the weighted sum, summed in signal order and rounded to 9
decimals so that a resumed run scores exactly as an uninterrupted one, is the score (`reward.weights`). A candidate
missing a weighted signal (e.g. no valid judge sample) is left out, never scored 0.

Selection is the paper's best vs worst; with length control (`pairs.rho` > 0, Meta-Rewarding) the chosen is the
shortest candidate in the top band [(1-rho)*Smax + rho*Smin, Smax] and the rejected the longest in the bottom band
[Smin, (1-rho)*Smin + rho*Smax]. Prompts whose chosen and rejected tie (or differ by no more than `pairs.min_margin`)
are dropped. Remaining ties are broken by candidate id, so the same scores always give the same pairs. Each pair records
the signals, weights and rho that made it. The stage also freezes the training set (prompt, chosen and rejected text)
as a Parquet snapshot that DPO reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .config import FlywheelConfig, content_hash
from .registry import Registry
from .stage import StageResult, run_stage

# One row per candidate that has every weighted signal: its raw signals and its combined score.
SCORED_CTE = """
judge AS (                      -- the judge signal: mean of the valid samples
    SELECT candidate_id, 'judge' AS signal, avg(score) AS value
    FROM judgments WHERE stage_run_id = $judge_sid AND score IS NOT NULL
    GROUP BY candidate_id
), signals AS (                 -- long format: (candidate, signal, value), weighted signals only
    SELECT c.prompt_id, c.candidate_id, c.num_tokens, s.signal, s.value, w.weight
    FROM (SELECT * FROM judge
          UNION ALL
          SELECT candidate_id, signal, value FROM rewards WHERE stage_run_id = $reward_sid AND value IS NOT NULL) s
    JOIN (SELECT unnest($weights, recursive := true)) w USING (signal)
    JOIN candidates c USING (candidate_id)
), complete AS (                -- candidates with every weighted signal
    SELECT * FROM signals
    QUALIFY count(*) OVER (PARTITION BY candidate_id) = len($weights)
), scored AS (
    SELECT prompt_id, candidate_id, any_value(num_tokens) AS num_tokens,
           CASE WHEN len($weights) = 1 THEN any_value(value)
                ELSE round(sum(weight * coalesce(z, 0) ORDER BY signal), 9) END AS score,  -- z NULL: all tie
           to_json(map(list(signal ORDER BY signal), list(value ORDER BY signal))) AS raw
    FROM (SELECT *, (value - avg(value) OVER w) / nullif(stddev_pop(value) OVER w, 0) AS z
          FROM complete WINDOW w AS (PARTITION BY prompt_id, signal))
    GROUP BY prompt_id, candidate_id
)
"""

# Per prompt with a scored candidate: its chosen (top band: shortest when rho > 0, then best, then largest id) and
# rejected (bottom band: longest, worst, then smallest id) candidate, with their score, raw signals and length.
# Taking a struct by arg_max/arg_min on a key that ends with the (unique) candidate id picks one whole row.
EXTREMES_SQL = f"""
CREATE OR REPLACE TEMP TABLE pair_extremes AS
WITH {SCORED_CTE}, bands AS (
    SELECT s.*, (1 - $rho) * max(score) OVER p + $rho * min(score) OVER p AS top_from,
                (1 - $rho) * min(score) OVER p + $rho * max(score) OVER p AS bottom_to,
                CASE WHEN $rho > 0 THEN -num_tokens ELSE 0 END AS shortness
    FROM scored s WINDOW p AS (PARTITION BY prompt_id)
)
SELECT prompt_id,
       arg_max({{'id': candidate_id, 'score': score, 'raw': raw, 'tokens': num_tokens}},
               (shortness, score, candidate_id)) FILTER (WHERE score >= top_from) AS ch,
       arg_min({{'id': candidate_id, 'score': score, 'raw': raw, 'tokens': num_tokens}},
               (shortness, score, candidate_id)) FILTER (WHERE score <= bottom_to) AS rj
FROM bands GROUP BY prompt_id
"""

# The same table when one signal is weighted and rho = 0 (the default): the score is the signal itself and the bands
# are the single best and worst, so one GROUP BY over the candidates' values does it, without z-scores or windows.
# {values}: (candidate_id, value) of the one signal, each candidate once.
FAST_EXTREMES_SQL = """
CREATE OR REPLACE TEMP TABLE pair_extremes AS
WITH v AS ({values}), best AS (
    SELECT c.prompt_id,
           arg_max({{'id': c.candidate_id, 'score': v.value, 'tokens': c.num_tokens}}, (v.value, c.candidate_id)) AS ch,
           arg_min({{'id': c.candidate_id, 'score': v.value, 'tokens': c.num_tokens}}, (v.value, c.candidate_id)) AS rj
    FROM v JOIN candidates c USING (candidate_id) GROUP BY c.prompt_id
)
SELECT prompt_id, {{'id': ch.id, 'score': ch.score, 'raw': json_object($signal, ch.score), 'tokens': ch.tokens}} AS ch,
       {{'id': rj.id, 'score': rj.score, 'raw': json_object($signal, rj.score), 'tokens': rj.tokens}} AS rj
FROM best
"""
JUDGE_VALUES = ("SELECT candidate_id, avg(score) AS value FROM judgments "
                "WHERE stage_run_id = $judge_sid AND score IS NOT NULL GROUP BY candidate_id")
REWARD_VALUES = ("SELECT candidate_id, value FROM rewards "
                 "WHERE stage_run_id = $reward_sid AND signal = $signal AND value IS NOT NULL")

# Prompts whose best and worst differ by more than min_margin become pairs.
PAIRS_SQL = """
INSERT INTO pairs
SELECT 'pr-' || sha256(concat_ws('|', $sid, prompt_id, ch.id, rj.id))[:16],
       prompt_id, ch.id, rj.id, ch.score, rj.score,
       json_object('weights', $weights_json::JSON, 'rho', $rho, 'chosen', ch.raw, 'rejected', rj.raw),
       $run_id, $iteration, $sid, $config_hash, now()
FROM pair_extremes
WHERE ch.score - rj.score > $min_margin
"""

SNAPSHOT_SQL = """
SELECT pr.pair_id, pr.prompt_id, p.text AS prompt, ch.text AS chosen, rj.text AS rejected,
       pr.chosen_score, pr.rejected_score
FROM pairs pr
JOIN prompts p ON p.prompt_id = pr.prompt_id
JOIN candidates ch ON ch.candidate_id = pr.chosen_id
JOIN candidates rj ON rj.candidate_id = pr.rejected_id
WHERE pr.stage_run_id = ?
ORDER BY pr.pair_id
"""


def active_weights(cfg: FlywheelConfig) -> list[dict]:
    return [{"signal": k, "weight": float(w)} for k, w in sorted(cfg.reward.weights.items()) if w]


def _score_params(cfg: FlywheelConfig, judge_sid: str, reward_sid: str | None) -> dict:
    return dict(judge_sid=judge_sid, reward_sid=reward_sid, weights=active_weights(cfg))


def combined_scores(reg: Registry, cfg: FlywheelConfig, judge_sid: str, reward_sid: str | None) -> list[dict]:
    """Every candidate with all weighted signals: prompt_id, candidate_id, score, raw signals, prompt and text."""
    sql = f"""WITH {SCORED_CTE}
        SELECT s.prompt_id, s.candidate_id, s.score, s.raw, s.num_tokens, p.text AS prompt, c.text AS text,
               p.reference
        FROM scored s JOIN candidates c USING (candidate_id) JOIN prompts p ON p.prompt_id = s.prompt_id
        ORDER BY s.prompt_id, s.candidate_id"""
    return reg.rows(sql, _score_params(cfg, judge_sid, reward_sid))


class SnapshotError(RuntimeError):
    pass


def snapshot_path(reg: Registry, sid: str) -> Path:
    return reg.root / "snapshots" / "pairs" / f"{sid}.parquet"


def table_hash(table: pa.Table) -> str:
    """sha256 of a table's content, from its Arrow buffers: column names and kinds, then per column the validity and
    the values (strings as lengths + bytes). It does not depend on chunking or on string vs large_string, so the table
    written and the one read back from the Parquet file hash alike; no value becomes a Python object."""
    h = hashlib.sha256()
    columns = []
    for name, col in zip(table.column_names, table.columns):
        arr = col.combine_chunks()
        kind = ("string" if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
                or pa.types.is_string_view(arr.type) else str(arr.type))
        columns.append((name, kind, arr))
    h.update(json.dumps([[name, kind] for name, kind, _ in columns] + [table.num_rows]).encode())
    for _, kind, arr in columns:
        h.update(arr.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
        if kind == "string":
            arr = arr.cast(pa.large_string()).fill_null("")
            offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
            h.update(np.diff(offsets).tobytes())
            h.update(memoryview(arr.buffers()[2])[int(offsets[0]) : int(offsets[-1])] if len(arr) else b"")
        elif pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_boolean(arr.type):
            filled = arr.fill_null(False if pa.types.is_boolean(arr.type) else 0)
            h.update(np.ascontiguousarray(filled.to_numpy(zero_copy_only=False)).tobytes())
        else:  # nested or temporal columns (none in the snapshot): their values as JSON
            h.update(json.dumps(arr.to_pylist(), sort_keys=True, default=str).encode())
    return h.hexdigest()


def write_snapshot(reg: Registry, sid: str) -> str:
    """Freeze the pairs of stage run `sid` (with their texts) as Parquet; returns the hash of the rows written
    (`table_hash`: hashing the Arrow buffers, not Python rows, keeps this a fraction of the write itself)."""
    path = snapshot_path(reg, sid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    table = reg.con.sql(SNAPSHOT_SQL, params=[sid]).to_arrow_table()
    rows_hash = table_hash(table)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half of one
    return rows_hash


def read_snapshot(reg: Registry, sid: str, expected_hash: str) -> list[dict]:
    """The training pairs of stage run `sid`, checked against the hash recorded when they were frozen.
    A missing file is written again from the registry; an unreadable or altered one is refused. A 16-character
    hash is one recorded before `table_hash` (the JSON of the rows, `content_hash`) and is checked that way."""
    path = snapshot_path(reg, sid)
    if not path.exists():
        write_snapshot(reg, sid)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise SnapshotError(f"pair snapshot {path} cannot be read ({e}); delete it and run again to rewrite it "
                            "from the registry") from None
    rows = table.to_pylist()
    found = content_hash(rows) if len(expected_hash) == 16 else table_hash(table)
    if found != expected_hash:
        raise SnapshotError(f"pair snapshot {path} does not match the hash recorded when it was written "
                            f"({expected_hash}); delete it and run again to rewrite it from the registry")
    return rows


def select_pairs(con: duckdb.DuckDBPyConnection, params: dict) -> None:
    """Fill the temp table pair_extremes (best and worst per scored prompt), then insert the pairs.
    `params`: the statements' parameters (judge_sid, reward_sid, weights, rho, sid, ...)."""
    weights = params["weights"]
    if len(weights) == 1 and params["rho"] == 0:
        signal = weights[0]["signal"]
        values = JUDGE_VALUES if signal == "judge" else REWARD_VALUES
        used = {"judge_sid"} if signal == "judge" else {"reward_sid"}
        con.execute(FAST_EXTREMES_SQL.format(values=values),
                    {"signal": signal, **{k: params[k] for k in used}})
    else:
        con.execute(EXTREMES_SQL, {k: params[k] for k in ("judge_sid", "reward_sid", "weights", "rho")})
    if con.execute("SELECT count(*) FROM pairs WHERE stage_run_id = ?", [params["sid"]]).fetchone()[0]:
        return  # an attempt that crashed after this commit inserted them: the same rows (one transaction, all or none)
    con.execute(PAIRS_SQL, {k: v for k, v in params.items() if k not in ("judge_sid", "reward_sid", "weights")})


def build_pairs(cfg: FlywheelConfig, run_id: str, iteration: int, judge_sid: str,
                reward_sid: str | None = None) -> StageResult:
    rho = cfg.pairs.rho_for(iteration)
    weights = active_weights(cfg)
    inputs = {"judgments": judge_sid, "rewards": reward_sid, "weights": weights, "rho": rho,
              "min_margin": cfg.pairs.min_margin}

    def work(reg: Registry, sid: str) -> dict:
        weights_json = json.dumps({w["signal"]: w["weight"] for w in weights})
        params = dict(**_score_params(cfg, judge_sid, reward_sid), weights_json=weights_json, rho=rho, sid=sid,
                      run_id=run_id, iteration=iteration, config_hash=cfg.config_hash(),
                      min_margin=cfg.pairs.min_margin)
        try:
            with reg.transaction() as con:
                select_pairs(con, params)
            rows_hash = write_snapshot(reg, sid)
            # the pairs just selected (the rows inserted, or those a crashed attempt had committed: the same)
            stats = reg.rows(
                "SELECT count(*) AS prompts, count(*) FILTER (WHERE ch.score - rj.score > $m) AS pairs, "
                "avg(ch.score - rj.score) FILTER (WHERE ch.score - rj.score > $m) AS mean_margin, "
                "avg((ch.tokens > rj.tokens)::INT) FILTER (WHERE ch.score - rj.score > $m) AS chosen_longer "
                "FROM pair_extremes", {"m": cfg.pairs.min_margin})[0]
        finally:
            reg.con.execute("DROP TABLE IF EXISTS pair_extremes")
        prompts = stats["prompts"]
        return {"pairs": stats["pairs"], "prompts_scored": prompts,
                "unpaired": prompts - stats["pairs"],  # best and worst tied, or within min_margin
                "mean_margin": round(stats["mean_margin"], 3) if stats["pairs"] else None,
                "chosen_longer": round(stats["chosen_longer"], 3) if stats["pairs"] else None,
                "signals": [w["signal"] for w in weights], "rho": rho,
                "snapshot": str(snapshot_path(reg, sid)), "snapshot_hash": rows_hash}

    return run_stage(cfg, "pairs", run_id, iteration, None, inputs, work)
