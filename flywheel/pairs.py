"""Pairs: per prompt, chosen = the best-scored candidate and rejected = the worst, in one SQL statement.

A candidate's score is the mean of its valid judge samples (parse failures excluded; a candidate with none is left
out). Prompts whose best and worst tie (or differ by no more than `pairs.min_margin`) are dropped. Ties in the
arg_max/arg_min are broken by candidate id, so the same judgments always give the same pairs. The stage also freezes
the training set (prompt, chosen and rejected text) as a Parquet snapshot that DPO reads.
"""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from .config import FlywheelConfig, content_hash
from .registry import Registry
from .stage import StageResult, run_stage

PAIRS_SQL = """
INSERT INTO pairs
WITH scored AS (                -- one row per candidate: the mean of its valid judge samples
    SELECT c.prompt_id, c.candidate_id, avg(j.score) AS score
    FROM candidates c JOIN judgments j USING (candidate_id)
    WHERE j.stage_run_id = $judge_sid AND j.score IS NOT NULL
    GROUP BY c.prompt_id, c.candidate_id
), extremes AS (                -- per prompt: best and worst candidate (ties broken by id)
    SELECT prompt_id,
           arg_max(candidate_id, (score, candidate_id)) AS chosen_id,  max(score) AS chosen_score,
           arg_min(candidate_id, (score, candidate_id)) AS rejected_id, min(score) AS rejected_score
    FROM scored GROUP BY prompt_id
)
SELECT 'pr-' || sha256(concat_ws('|', $sid, prompt_id, chosen_id, rejected_id))[:16],
       prompt_id, chosen_id, rejected_id, chosen_score, rejected_score,
       $run_id, $iteration, $sid, $config_hash, now()
FROM extremes
WHERE chosen_score - rejected_score > $min_margin
ON CONFLICT DO NOTHING
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


class SnapshotError(RuntimeError):
    pass


def snapshot_path(reg: Registry, sid: str) -> Path:
    return reg.root / "snapshots" / "pairs" / f"{sid}.parquet"


def write_snapshot(reg: Registry, sid: str) -> str:
    """Freeze the pairs of stage run `sid` (with their texts) as Parquet; returns the hash of the rows written."""
    path = snapshot_path(reg, sid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    table = reg.con.sql(SNAPSHOT_SQL, params=[sid]).to_arrow_table()
    rows_hash = content_hash(table.to_pylist())
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half of one
    return rows_hash


def read_snapshot(reg: Registry, sid: str, expected_hash: str) -> list[dict]:
    """The training pairs of stage run `sid`, checked against the hash recorded when they were frozen.
    A missing file is written again from the registry; an unreadable or altered one is refused."""
    path = snapshot_path(reg, sid)
    if not path.exists():
        write_snapshot(reg, sid)
    try:
        rows = duckdb.sql(f"SELECT * FROM read_parquet('{path}')").to_arrow_table().to_pylist()
    except duckdb.Error as e:
        raise SnapshotError(f"pair snapshot {path} cannot be read ({e}); delete it and run again to rewrite it "
                            "from the registry") from None
    if content_hash(rows) != expected_hash:
        raise SnapshotError(f"pair snapshot {path} does not match the hash recorded when it was written "
                            f"({expected_hash}); delete it and run again to rewrite it from the registry")
    return rows


def build_pairs(cfg: FlywheelConfig, run_id: str, iteration: int, judge_sid: str) -> StageResult:
    inputs = {"judgments": judge_sid, "cfg": cfg.pairs.model_dump()}

    def work(reg: Registry, sid: str) -> dict:
        with reg.transaction() as con:
            con.execute(PAIRS_SQL, dict(judge_sid=judge_sid, sid=sid, run_id=run_id, iteration=iteration,
                                        config_hash=cfg.config_hash(), min_margin=cfg.pairs.min_margin))
        rows_hash = write_snapshot(reg, sid)
        row = reg.rows(
            "SELECT count(DISTINCT c.prompt_id) AS prompts FROM judgments j JOIN candidates c USING (candidate_id) "
            "WHERE j.stage_run_id = ? AND j.score IS NOT NULL", [judge_sid])[0]
        stats = reg.rows("SELECT count(*) AS pairs, avg(chosen_score - rejected_score) AS mean_margin "
                         "FROM pairs WHERE stage_run_id = ?", [sid])[0]
        return {"pairs": stats["pairs"], "prompts_scored": row["prompts"],
                "unpaired": row["prompts"] - stats["pairs"],  # best and worst tied, or within min_margin
                "mean_margin": round(stats["mean_margin"], 3) if stats["pairs"] else None,
                "snapshot": str(snapshot_path(reg, sid)), "snapshot_hash": rows_hash}

    return run_stage(cfg, "pairs", run_id, iteration, None, inputs, work)
