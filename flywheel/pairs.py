"""Pairs: per prompt, chosen = the best-scored candidate and rejected = the worst, in SQL.

A candidate's signals are the mean of its valid judge samples (parse failures excluded) and, when a reward stage ran,
its coherent and rule rewards. With one signal weighted (the default: the judge), the score is that signal as it is.
With several, each is z-scored within its prompt and the weighted sum is the score (`reward.weights`). A candidate
missing a weighted signal (e.g. no valid judge sample) is left out, never scored 0.

Selection is the paper's best vs worst; with length control (`pairs.rho` > 0, Meta-Rewarding) the chosen is the
shortest candidate in the top band [(1-rho)*Smax + rho*Smin, Smax] and the rejected the longest in the bottom band
[Smin, (1-rho)*Smin + rho*Smax]. Prompts whose chosen and rejected tie (or differ by no more than `pairs.min_margin`)
are dropped. Remaining ties are broken by candidate id, so the same scores always give the same pairs. Each pair records
the signals, weights and rho that made it. The stage also freezes the training set (prompt, chosen and rejected text)
as a Parquet snapshot that DPO reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
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
                ELSE sum(weight * coalesce(z, 0)) END AS score,             -- z is NULL when a prompt's values all tie
           json_group_object(signal, value) AS raw
    FROM (SELECT *, (value - avg(value) OVER w) / nullif(stddev_pop(value) OVER w, 0) AS z
          FROM complete WINDOW w AS (PARTITION BY prompt_id, signal))
    GROUP BY prompt_id, candidate_id
)
"""

PAIRS_SQL = f"""
INSERT INTO pairs
WITH {SCORED_CTE}, bands AS (
    SELECT s.*, (1 - $rho) * max(score) OVER p + $rho * min(score) OVER p AS top_from,
                (1 - $rho) * min(score) OVER p + $rho * max(score) OVER p AS bottom_to,
                CASE WHEN $rho > 0 THEN -num_tokens ELSE 0 END AS shortness
    FROM scored s WINDOW p AS (PARTITION BY prompt_id)
), extremes AS (                -- top band: shortest (rho > 0), best, then id; bottom band: longest, worst, then id
    SELECT prompt_id,
           arg_max(candidate_id, (shortness, score, candidate_id)) FILTER (WHERE score >= top_from) AS chosen_id,
           arg_min(candidate_id, (shortness, score, candidate_id)) FILTER (WHERE score <= bottom_to) AS rejected_id
    FROM bands GROUP BY prompt_id
)
SELECT 'pr-' || sha256(concat_ws('|', $sid, e.prompt_id, chosen_id, rejected_id))[:16],
       e.prompt_id, chosen_id, rejected_id, ch.score, rj.score,
       json_object('weights', $weights_json::JSON, 'rho', $rho, 'chosen', ch.raw, 'rejected', rj.raw),
       $run_id, $iteration, $sid, $config_hash, now()
FROM extremes e
JOIN scored ch ON ch.candidate_id = e.chosen_id
JOIN scored rj ON rj.candidate_id = e.rejected_id
WHERE ch.score - rj.score > $min_margin
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


def build_pairs(cfg: FlywheelConfig, run_id: str, iteration: int, judge_sid: str,
                reward_sid: str | None = None) -> StageResult:
    rho = cfg.pairs.rho_for(iteration)
    weights = active_weights(cfg)
    inputs = {"judgments": judge_sid, "rewards": reward_sid, "weights": weights, "rho": rho,
              "min_margin": cfg.pairs.min_margin}

    def work(reg: Registry, sid: str) -> dict:
        weights_json = json.dumps({w["signal"]: w["weight"] for w in weights})
        with reg.transaction() as con:
            con.execute(PAIRS_SQL, dict(**_score_params(cfg, judge_sid, reward_sid), weights_json=weights_json,
                                        rho=rho, sid=sid, run_id=run_id, iteration=iteration,
                                        config_hash=cfg.config_hash(), min_margin=cfg.pairs.min_margin))
        rows_hash = write_snapshot(reg, sid)
        prompts = reg.scalar(f"WITH {SCORED_CTE} SELECT count(DISTINCT prompt_id) FROM scored",
                             _score_params(cfg, judge_sid, reward_sid))
        stats = reg.rows(
            "SELECT count(*) AS pairs, avg(chosen_score - rejected_score) AS mean_margin, "
            "avg((ch.num_tokens > rj.num_tokens)::INT) AS chosen_longer FROM pairs pr "
            "JOIN candidates ch ON ch.candidate_id = pr.chosen_id JOIN candidates rj ON rj.candidate_id = pr.rejected_id "
            "WHERE pr.stage_run_id = ?", [sid])[0]
        return {"pairs": stats["pairs"], "prompts_scored": prompts,
                "unpaired": prompts - stats["pairs"],  # best and worst tied, or within min_margin
                "mean_margin": round(stats["mean_margin"], 3) if stats["pairs"] else None,
                "chosen_longer": round(stats["chosen_longer"], 3) if stats["pairs"] else None,
                "signals": [w["signal"] for w in weights], "rho": rho,
                "snapshot": str(snapshot_path(reg, sid)), "snapshot_hash": rows_hash}

    return run_stage(cfg, "pairs", run_id, iteration, None, inputs, work)
