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
the signals, weights and rho that made it.

Temporal anchoring (`pairs.anchor: m1`, Temporal Self-Rewarding; `anchor_id` is M1 from iteration 2 on): the generate
stage also sampled the anchor model, and each prompt's chosen is the best of M_t's candidates (every candidate not the
anchor's) and its rejected the worst of the anchor's, each side with its own bands; scores are combined over all the
prompt's candidates as above. The pair records the anchor ('anchor' in its signals); a prompt whose M_t best does not
beat the anchor's worst by more than `min_margin` is dropped like any other. Without an anchor the stage's inputs,
statements and rows are what they were before anchoring existed.

Step-wise pairs (`pairs.mode: step`, process rewards: flywheel/stages/steps.py): two candidates of a prompt that share
their first k steps (equal `prefix_hash` at step k) and differ at step k are a fork; chosen is the one whose step k
scores higher by the step reward (the weighted sum of the weighted step signals, `step_rule` / `step_judge`, at that
step), rejected the other. Per prompt one fork whose margin is above `pairs.min_margin` is kept: the one whose chosen
candidate's worst step scores highest (a chosen chain right to its end, when the prompt has one), then the deepest
(the more steps the two share, the more exactly the pair names the step that went wrong), then the larger margin,
then candidate ids. The pair records the fork's step, where it starts in each text and each side's worst step score
(`signals`); its training texts are the two whole candidates, whose shared prefix adds the same log-probability to
both sides of DPO's margin (for the policy and the reference alike) and so cancels: the loss is on the continuations
from the fork. Whole texts, not the prefix plus the one step: a text cut after a step would end in the end-of-turn
token there and teach the model to stop mid-chain; and the chosen side is preferred complete because the NLL term
(`dpo.nll_weight`) trains on all of it.

What the stage freezes: the pairs are selected and joined to their texts once, into a temp table in pair_id order
(`flywheel.registry.datasets.prepared_rows`); the pairs table is filled from it, and `run_stage`'s freeze writes the stage's
dataset versions from it without querying the registry again: "pairs" (the pairs table's rows, with their signals)
and "train" (prompt, chosen and rejected text plus ids and scores, TRL's preference format), content-hashed Parquet
files (`flywheel.registry.datasets`). The train version is the one frozen training set: DPO reads it
(`stage_version(reg, sid, "train")` + `read_version`, which refuses a missing or altered file).
"""

from __future__ import annotations

import json

import duckdb

from ..config import FlywheelConfig
from ..registry import Registry
from ..registry.datasets import prepared_rows
from ..stage import StageResult, run_stage

# One row per candidate that has every weighted signal: its raw signals and its combined score.
SCORED_CTE = """
judge AS (                      -- the judge signal: mean of the valid samples
    SELECT candidate_id, 'judge' AS signal, avg(score) AS value
    FROM judgments WHERE stage_run_id = $judge_sid AND score IS NOT NULL
    GROUP BY candidate_id
), signals AS (                 -- long format: (candidate, signal, value), weighted signals only
    SELECT c.prompt_id, c.candidate_id, c.rowid AS candidate_row, c.num_tokens, c.model_id, s.signal, s.value,
           w.weight
    FROM (SELECT * FROM judge
          UNION ALL
          SELECT candidate_id, signal, value FROM rewards WHERE stage_run_id = $reward_sid AND value IS NOT NULL) s
    JOIN (SELECT unnest($weights, recursive := true)) w USING (signal)
    JOIN candidates c USING (candidate_id)
), complete AS (                -- candidates with every weighted signal
    SELECT * FROM signals
    QUALIFY count(*) OVER (PARTITION BY candidate_id) = len($weights)
), scored AS (
    SELECT prompt_id, candidate_id, any_value(candidate_row) AS candidate_row, any_value(num_tokens) AS num_tokens,
           any_value(model_id) AS model_id,
           CASE WHEN len($weights) = 1 THEN any_value(value)
                ELSE round(sum(weight * coalesce(z, 0) ORDER BY signal), 9) END AS score,  -- z NULL: all tie
           to_json(map(list(signal ORDER BY signal), list(value ORDER BY signal))) AS raw
    FROM (SELECT *, (value - avg(value) OVER w) / nullif(stddev_pop(value) OVER w, 0) AS z
          FROM complete WINDOW w AS (PARTITION BY prompt_id, signal))
    GROUP BY prompt_id, candidate_id
)
"""

# Per prompt with a scored candidate: its chosen (top band: shortest when rho > 0, then best, then largest id) and
# rejected (bottom band: longest, worst, then smallest id) candidate, with their score and raw signals. A candidate is
# named by its row in `candidates` (rowid, valid within the transaction that reads it): the pair rows fetch its id,
# text and length by it, a join much cheaper than one on the id. Taking a struct by arg_max/arg_min on a key that
# ends with the (unique) candidate id picks one whole row. Anchored ($anchor: the anchor model's id), the bands are
# per side (the anchor's candidates, the others') and the chosen is taken from the others, the rejected from the
# anchor's; a prompt missing a side gets NULL there (and no pair).
def _extremes_sql(anchored: bool) -> str:
    scored = "(SELECT *, model_id = $anchor AS from_anchor FROM scored)" if anchored else "scored"
    side, chosen, rejected = (", from_anchor", " AND NOT from_anchor", " AND from_anchor") if anchored else ("",) * 3
    return f"""
CREATE OR REPLACE TEMP TABLE pair_extremes AS
WITH {SCORED_CTE}, bands AS (
    SELECT s.*, (1 - $rho) * max(score) OVER p + $rho * min(score) OVER p AS top_from,
                (1 - $rho) * min(score) OVER p + $rho * max(score) OVER p AS bottom_to,
                CASE WHEN $rho > 0 THEN -num_tokens ELSE 0 END AS shortness
    FROM {scored} s WINDOW p AS (PARTITION BY prompt_id{side})
)
SELECT prompt_id, ch.row_id AS chosen_row, ch.score AS chosen_score, ch.raw AS chosen_raw,
       rj.row_id AS rejected_row, rj.score AS rejected_score, rj.raw AS rejected_raw, scored
FROM (SELECT prompt_id, count(*) AS scored,
             arg_max({{'row_id': candidate_row, 'score': score, 'raw': raw}}, (shortness, score, candidate_id))
                 FILTER (WHERE score >= top_from{chosen}) AS ch,
             arg_min({{'row_id': candidate_row, 'score': score, 'raw': raw}}, (shortness, score, candidate_id))
                 FILTER (WHERE score <= bottom_to{rejected}) AS rj
      FROM bands GROUP BY prompt_id)
"""


EXTREMES_SQL = _extremes_sql(anchored=False)

# Step-wise pairs: the same pair_extremes table (one row per prompt with a fork, rows named by candidates.rowid), from
# the reward stage's steps and step rewards ($reward_sid). A step's score is the weighted sum of its weighted step
# signals (a step missing one is not scored); a fork is two steps of one prompt at the same index with the same
# prefix hash and different texts (each fork once), the higher-scored one chosen. `scored`: the prompt's candidates
# with a scored step.
STEP_EXTREMES_SQL = """
CREATE OR REPLACE TEMP TABLE pair_extremes AS
WITH step_scores AS (
    SELECT r.step_id, round(sum(w.weight * r.value ORDER BY r.signal), 9) AS score,
           to_json(map(list(r.signal ORDER BY r.signal), list(r.value ORDER BY r.signal))) AS raw
    FROM step_rewards r JOIN (SELECT unnest($weights, recursive := true)) w USING (signal)
    WHERE r.stage_run_id = $reward_sid AND r.value IS NOT NULL
    GROUP BY r.step_id HAVING count(*) = len($weights)
), s AS (
    SELECT c.prompt_id, c.rowid AS candidate_row, st.candidate_id, st.step_index, st.text, st.start_char,
           st.prefix_hash, ss.score, ss.raw, min(ss.score) OVER (PARTITION BY st.candidate_id) AS worst_step
    FROM steps st JOIN step_scores ss USING (step_id) JOIN candidates c USING (candidate_id)
    WHERE st.stage_run_id = $reward_sid
), forks AS (
    SELECT a.prompt_id, a.step_index AS step, a.score - b.score AS margin, a.worst_step AS chosen_worst,
           {'row_id': a.candidate_row, 'score': a.score, 'raw': a.raw, 'at': a.start_char,
            'worst': a.worst_step} AS ch,
           {'row_id': b.candidate_row, 'score': b.score, 'raw': b.raw, 'at': b.start_char,
            'worst': b.worst_step} AS rj,
           a.candidate_id AS a_id, b.candidate_id AS b_id
    FROM s a JOIN s b ON a.prompt_id = b.prompt_id AND a.step_index = b.step_index
                     AND a.prefix_hash = b.prefix_hash AND a.text <> b.text
                     AND (a.score > b.score OR (a.score = b.score AND a.candidate_id < b.candidate_id))
), best AS (
    SELECT prompt_id, arg_max({'ch': ch, 'rj': rj, 'step': step}, (chosen_worst, step, margin, a_id, b_id)) AS f
    FROM forks WHERE margin > $min_margin GROUP BY prompt_id
)
SELECT n.prompt_id, f.ch.row_id AS chosen_row, f.ch.score AS chosen_score,
       json_object('step', f.step, 'at', f.ch.at, 'step_scores', f.ch.raw, 'worst_step', f.ch.worst) AS chosen_raw,
       f.rj.row_id AS rejected_row, f.rj.score AS rejected_score,
       json_object('step', f.step, 'at', f.rj.at, 'step_scores', f.rj.raw, 'worst_step', f.rj.worst) AS rejected_raw,
       n.scored, f.step AS fork_step, n.forks
FROM (SELECT prompt_id, count(DISTINCT candidate_id) AS scored,
             (SELECT count(*) FROM forks WHERE forks.prompt_id = s.prompt_id) AS forks FROM s GROUP BY prompt_id) n
LEFT JOIN best USING (prompt_id)
"""
ANCHORED_EXTREMES_SQL = _extremes_sql(anchored=True)

# The same table when one signal is weighted, rho = 0 and no anchor (the default): the score is the signal itself and
# the bands are the single best and worst, so one GROUP BY over the candidates' values does it, without z-scores or
# windows.
# Only the rows are taken by arg_max/arg_min (a struct payload costs more than the rest of the statement); the chosen
# score is then the maximum and the rejected the minimum. {values}: (candidate_id, value) of the one signal, each
# candidate once.
FAST_EXTREMES_SQL = """
CREATE OR REPLACE TEMP TABLE pair_extremes AS
SELECT prompt_id, chosen_row, chosen_score, json_object($signal, chosen_score) AS chosen_raw,
       rejected_row, rejected_score, json_object($signal, rejected_score) AS rejected_raw, scored
FROM (SELECT c.prompt_id, count(*) AS scored,
             arg_max(c.rowid, (v.value, c.candidate_id)) AS chosen_row, max(v.value) AS chosen_score,
             arg_min(c.rowid, (v.value, c.candidate_id)) AS rejected_row, min(v.value) AS rejected_score
      FROM ({values}) v JOIN candidates c USING (candidate_id) GROUP BY c.prompt_id)
"""
JUDGE_VALUES = ("SELECT candidate_id, avg(score) AS value FROM judgments "
                "WHERE stage_run_id = $judge_sid AND score IS NOT NULL GROUP BY candidate_id")
REWARD_VALUES = ("SELECT candidate_id, value FROM rewards "
                 "WHERE stage_run_id = $reward_sid AND signal = $signal AND value IS NOT NULL")

# Prompts whose best and worst differ by more than min_margin become pairs: one row each, with the pair's signals and
# the texts of its prompt and candidates, in pair_id order (the order of the datasets). The pairs table is filled from
# it, and the freeze writes the "pairs" and "train" versions from it as it is: the rows are selected, sorted and
# joined to their texts once. Candidates are fetched by rowid; the prompt by a LEFT JOIN, so that a pair whose prompt
# row is gone is still a pair (the train SQL's inner join leaves it out of the training set: see build_pairs).
PAIR_ROWS_SQL = """
CREATE OR REPLACE TEMP TABLE {table} AS
SELECT 'pr-' || sha256(concat_ws('|', $sid, e.prompt_id, ch.candidate_id, rj.candidate_id))[:16] AS pair_id,
       e.prompt_id, ch.candidate_id AS chosen_id, rj.candidate_id AS rejected_id, e.chosen_score, e.rejected_score,
       json_object('weights', $weights_json::JSON, 'rho', $rho, 'chosen', e.chosen_raw, 'rejected', e.rejected_raw
                   {anchor}) AS signals,
       $iteration::INTEGER AS iteration, p.text AS prompt, ch.text AS chosen, rj.text AS rejected,
       ch.num_tokens > rj.num_tokens AS chosen_longer
FROM pair_extremes e
JOIN candidates ch ON ch.rowid = e.chosen_row
JOIN candidates rj ON rj.rowid = e.rejected_row
LEFT JOIN prompts p ON p.prompt_id = e.prompt_id
WHERE e.chosen_score - e.rejected_score > $min_margin
ORDER BY pair_id
"""
INSERT_PAIRS_SQL = """
INSERT INTO pairs
SELECT pair_id, prompt_id, chosen_id, rejected_id, chosen_score, rejected_score, signals,
       $run_id, iteration, $sid, $config_hash, now()
FROM {table}
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


def select_pairs(con: duckdb.DuckDBPyConnection, params: dict, table: str) -> None:
    """Fill the temp table pair_extremes (best and worst per scored prompt) and the temp table `table` (the pairs, with
    their texts, in pair_id order), then insert the pairs. `params`: the statements' parameters (judge_sid,
    reward_sid, weights, rho, sid, ...; anchor when anchored)."""
    weights = params["weights"]
    anchored = params.get("anchor") is not None
    if params.get("mode") == "step":
        con.execute(STEP_EXTREMES_SQL, {k: params[k] for k in ("reward_sid", "weights", "min_margin")})
    elif anchored:
        con.execute(ANCHORED_EXTREMES_SQL,
                    {k: params[k] for k in ("judge_sid", "reward_sid", "weights", "rho", "anchor")})
    elif len(weights) == 1 and params["rho"] == 0:
        signal = weights[0]["signal"]
        values = JUDGE_VALUES if signal == "judge" else REWARD_VALUES
        used = {"judge_sid"} if signal == "judge" else {"reward_sid"}
        con.execute(FAST_EXTREMES_SQL.format(values=values),
                    {"signal": signal, **{k: params[k] for k in used}})
    else:
        con.execute(EXTREMES_SQL, {k: params[k] for k in ("judge_sid", "reward_sid", "weights", "rho")})
    extra = ", 'anchor', $anchor" if anchored else ", 'mode', 'step'" if params.get("mode") == "step" else ""
    con.execute(PAIR_ROWS_SQL.format(table=table, anchor=extra),
                {k: params[k] for k in ("sid", "weights_json", "rho", "iteration", "min_margin",
                                        *(("anchor",) if anchored else ()))})
    if con.execute("SELECT count(*) FROM pairs WHERE stage_run_id = ?", [params["sid"]]).fetchone()[0]:
        return  # an attempt that crashed after this commit inserted them: the same rows (one transaction, all or none)
    con.execute(INSERT_PAIRS_SQL.format(table=table), {k: params[k] for k in ("sid", "run_id", "config_hash")})


def unpaired_step_prompts(reg: Registry, params: dict) -> dict[str, int]:
    """Step mode: why prompts made no pair: none of their candidates has a scored step, their scored candidates
    never fork (no two share a prefix and then differ), or every fork's step scores tie or differ by no more than
    `pairs.min_margin`."""
    row = reg.rows(
        """SELECT (SELECT count(DISTINCT c.prompt_id) FROM candidates c JOIN rewards r USING (candidate_id)
                   WHERE r.stage_run_id = $reward_sid) - count(*) AS no_scored_step,
                  count(*) FILTER (WHERE chosen_row IS NULL AND forks = 0) AS no_fork,
                  count(*) FILTER (WHERE chosen_row IS NULL AND forks > 0) AS forks_within_min_margin
           FROM pair_extremes""", {"reward_sid": params["reward_sid"]})[0]
    return {k: int(v or 0) for k, v in row.items()}


def unpaired_prompts(reg: Registry, params: dict) -> dict[str, int]:
    """Why the prompts that made no pair made none (read from pair_extremes, before it is dropped): no candidate
    with every signal, one such candidate, best and worst tied, or apart by no more than `pairs.min_margin`; anchored,
    also: none of M_t's or none of the anchor's candidates scored, or the anchor's worst scored above M_t's best."""
    anchored_only = """, count(*) FILTER (WHERE scored > 1 AND (chosen_score IS NULL OR rejected_score IS NULL))
                      AS one_side_unscored,
                  count(*) FILTER (WHERE chosen_score < rejected_score) AS anchor_scored_higher"""
    row = reg.rows(
        """SELECT (SELECT count(DISTINCT prompt_id) FROM candidates WHERE candidate_id IN (
                       SELECT candidate_id FROM judgments WHERE stage_run_id = $judge_sid
                       UNION ALL SELECT candidate_id FROM rewards WHERE stage_run_id = $reward_sid))
                  - count(*) AS no_scored_candidate,
                  count(*) FILTER (WHERE scored = 1) AS one_scored_candidate,
                  count(*) FILTER (WHERE scored > 1 AND chosen_score = rejected_score) AS tie,
                  count(*) FILTER (WHERE scored > 1 AND chosen_score > rejected_score
                                   AND chosen_score - rejected_score <= $min_margin) AS within_min_margin
                  {anchored_only}
           FROM pair_extremes""".format(anchored_only=anchored_only if params.get("anchor") is not None else ""),
        {k: params[k] for k in ("judge_sid", "reward_sid", "min_margin")})[0]
    return {k: int(v or 0) for k, v in row.items()}


def build_pairs(cfg: FlywheelConfig, run_id: str, iteration: int, judge_sid: str,
                reward_sid: str | None = None, anchor_id: str | None = None) -> StageResult:
    """`anchor_id`: the model whose candidates are the rejected side (`pairs.anchor`), or None for best vs worst."""
    rho = cfg.pairs.rho_for(iteration)
    weights = active_weights(cfg)
    step_mode = cfg.pairs.mode == "step"
    if step_mode:  # chosen by the step signals alone
        weights = [w for w in weights if w["signal"] in cfg.steps.signals()]
        if reward_sid is None:
            raise ValueError("pairs.mode=step needs the reward stage's steps and step rewards (steps.split)")
    inputs = {"judgments": judge_sid, "rewards": reward_sid, "weights": weights, "rho": rho,
              "min_margin": cfg.pairs.min_margin}
    if anchor_id is not None:
        inputs["anchor"] = anchor_id
    if step_mode:
        inputs["mode"] = "step"
        inputs["step_selection"] = "complete-chosen, deepest fork"  # (the first selection was the deepest fork)

    def work(reg: Registry, sid: str) -> dict:
        weights_json = json.dumps({w["signal"]: w["weight"] for w in weights})
        params = dict(**_score_params(cfg, judge_sid, reward_sid), weights_json=weights_json, rho=rho, sid=sid,
                      run_id=run_id, iteration=iteration, config_hash=cfg.config_hash(),
                      min_margin=cfg.pairs.min_margin, anchor=anchor_id, mode=cfg.pairs.mode)
        table = prepared_rows(sid)  # left for run_stage's freeze, which writes the versions from it and drops it
        try:
            with reg.transaction() as con:
                select_pairs(con, params, table)
            # the pairs just selected (the rows inserted, or those a crashed attempt had committed: the same)
            unpaired = unpaired_step_prompts(reg, params) if step_mode else unpaired_prompts(reg, params)
            forks = reg.rows("SELECT avg(fork_step) AS mean_step, histogram(fork_step) AS at FROM pair_extremes "
                             "WHERE chosen_row IS NOT NULL")[0] if step_mode else None
            stats = reg.rows(
                f"SELECT (SELECT count(*) FROM pair_extremes) AS prompts, count(*) AS pairs, "
                f"avg(chosen_score - rejected_score) AS mean_margin, avg(chosen_longer::INT) AS chosen_longer, "
                f"count(*) FILTER (WHERE prompt IS NULL) AS no_prompt FROM {table}")[0]
            if stats["no_prompt"]:  # a pair whose prompt row is gone: the train SQL (an inner join) leaves it out
                reg.con.execute(f"DROP TABLE {table}")
        except BaseException:
            reg.con.execute(f"DROP TABLE IF EXISTS {table}")
            raise
        finally:
            reg.con.execute("DROP TABLE IF EXISTS pair_extremes")
        return {"pairs": stats["pairs"], "prompts_scored": stats["prompts"], "unpaired": unpaired,
                "mean_margin": round(stats["mean_margin"], 3) if stats["pairs"] else None,
                "chosen_longer": round(stats["chosen_longer"], 3) if stats["pairs"] else None,
                "signals": [w["signal"] for w in weights], "rho": rho,
                **({"anchor": anchor_id, "anchored": stats["pairs"]} if anchor_id is not None else {}),
                **({"mode": "step", "fork_step_mean": None if forks["mean_step"] is None else
                    round(forks["mean_step"], 3), "fork_steps": {str(k): v for k, v in (forks["at"] or {}).items()}}
                   if step_mode else {})}

    return run_stage(cfg, "pairs", run_id, iteration, None, inputs, work)
