"""The per-iteration report of a run: what each iteration made, how it was judged, and the failure-mode monitors.

    iterations = collect(reg, run_id)                    # one dict of figures per iteration >= 1, from the registry
    checks = evaluate(iterations, monitors_config(reg, run_id))   # flywheel.analysis.monitors, thresholds from the run config
    iterations, checks, path = write(reg, run_id)        # <registry>/runs/<run_id>/report.md, report.json, PNG plots
    text = markdown(reg, run_id)                         # the same tables as one string (for a Prefect artifact)
    print_report(run_id, iterations, checks, console)    # rich tables on the terminal

Figures per iteration (scoped to the stage runs the run used, so a stage reused from another run still counts):
prompts made / kept / dropped by reason; candidates; judge samples and parse-failure rate; the candidates' mean
scores and the raw sample scores as histograms; mean response length in tokens and words; distinct-1/2 over the
candidates' words; pairs, their score margins (in the units pairs were chosen by: judge points, or a weighted sum of
z-scores when several signals are weighted) and the share whose chosen is the longer; the Spearman agreement of
the judge with the coherent reward (None without one) and with itself (its first two valid samples); rule rewards;
the trained model's metrics; `delta`, the change of the main figures since the previous iteration; and `examples`,
three of the iteration's pairs (largest, median and smallest margin) with their texts, the judge's mean score and one
judge sample's raw text per side, and the pair's other signals (`example_pairs`): cut short on the terminal, in full
in report.md and report.json. The `flywheel.analysis.monitors` checks are evaluated on these figures. Nothing here loads a model.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..progress import grid_table
from ..registry import Registry
from .monitors import Check, MonitorsConfig, evaluate, fired

# (key, label, format) of the figures compared across iterations; `delta` holds their changes.
MAIN = [
    ("prompts_kept", "prompts kept", "{:.0f}"),
    ("candidates", "candidates", "{:.0f}"),
    ("mean_score", "mean judge score (0-5)", "{:.2f}"),
    ("parse_failure_rate", "parse-failure rate", "{:.1%}"),
    ("mean_tokens", "mean length (tokens)", "{:.1f}"),
    ("mean_words", "mean length (words)", "{:.1f}"),
    ("distinct_2", "distinct-2", "{:.3f}"),
    ("pairs", "pairs", "{:.0f}"),
    ("mean_margin", "mean pair margin", "{:.2f}"),
    ("longer_chosen_share", "chosen is the longer", "{:.0%}"),
    ("agreement", "judge vs coherent (Spearman)", "{:+.2f}"),
    ("judge_self_agreement", "judge vs itself (Spearman)", "{:+.2f}"),
    ("train_loss", "train loss", "{:.3f}"),
]
SCORE_BINS = [i / 2 for i in range(11)]  # 0, 0.5, ..., 5: the histogram of candidates' mean scores
DISTINCT_BUDGET = 20_000  # n-grams counted per iteration, so iterations of different sizes compare
_WORD = re.compile(r"\w+")
CLIP = 300  # characters of each text the terminal shows of an example pair (report.md and report.json: all)

# The example pairs of a pairs stage run: with its pairs ordered by (margin, pair_id), positions n (largest margin),
# (n - 1) // 2 + 1 (median) and 1 (smallest), each once; with the texts and, per side, the judge's mean over the valid
# samples of the judge stage run and the raw text of its first valid sample (else of its first sample).
EXAMPLES_SQL = """
WITH picked AS (
    SELECT * FROM (
        SELECT *, chosen_score - rejected_score AS margin,
               row_number() OVER (ORDER BY chosen_score - rejected_score, pair_id) AS pos, count(*) OVER () AS n
        FROM pairs WHERE stage_run_id = $pairs_sid)
    WHERE pos IN (1, (n - 1) // 2 + 1, n)
), judged AS (
    SELECT candidate_id, avg(score) AS mean, count(score) AS valid, count(*) AS samples,
           coalesce(arg_min({'raw': raw_text, 'i': sample_index, 's': score}, sample_index)
                        FILTER (WHERE score IS NOT NULL),
                    arg_min({'raw': raw_text, 'i': sample_index, 's': score}, sample_index)) AS pick
    FROM judgments
    WHERE stage_run_id = $judge_sid
      AND candidate_id IN (SELECT chosen_id FROM picked UNION ALL SELECT rejected_id FROM picked)
    GROUP BY candidate_id
)
SELECT pr.pair_id, pr.prompt_id, pr.margin, pr.pos, pr.n, pr.signals, p.text AS prompt,
       pr.chosen_id AS ch_id, ch.text AS ch_text, ch.num_tokens AS ch_tokens, pr.chosen_score AS ch_score,
       jc.mean AS ch_mean, jc.valid AS ch_valid, jc.samples AS ch_samples, jc.pick.raw AS ch_rationale,
       jc.pick.i AS ch_sample, jc.pick.s AS ch_sample_score,
       pr.rejected_id AS rj_id, rj.text AS rj_text, rj.num_tokens AS rj_tokens, pr.rejected_score AS rj_score,
       jr.mean AS rj_mean, jr.valid AS rj_valid, jr.samples AS rj_samples, jr.pick.raw AS rj_rationale,
       jr.pick.i AS rj_sample, jr.pick.s AS rj_sample_score
FROM picked pr
JOIN prompts p ON p.prompt_id = pr.prompt_id
JOIN candidates ch ON ch.candidate_id = pr.chosen_id
JOIN candidates rj ON rj.candidate_id = pr.rejected_id
LEFT JOIN judged jc ON jc.candidate_id = pr.chosen_id
LEFT JOIN judged jr ON jr.candidate_id = pr.rejected_id
ORDER BY pr.pos DESC
"""


# --- collecting -----------------------------------------------------------------------------------------------------
def runs(reg: Registry) -> list[str]:
    """Run ids, newest first."""
    return [r["run_id"] for r in reg.rows("SELECT run_id FROM runs ORDER BY created_at DESC, run_id")]


def resolve_run(reg: Registry, run_id: str | None) -> str:
    """`run_id`, or the newest run when None; a clear ValueError when there is none or it is unknown."""
    known = runs(reg)
    if not known:
        raise ValueError(f"the registry {reg.path} holds no runs yet")
    if run_id is None:
        return known[0]
    if run_id not in known:
        raise ValueError(f"no run {run_id!r} in {reg.path}; runs there: {', '.join(known)}")
    return run_id


def monitors_config(reg: Registry, run_id: str) -> MonitorsConfig:
    """The run config's `monitors` section, or the defaults when it has none."""
    raw = reg.scalar("SELECT config FROM runs WHERE run_id = ?", [run_id])
    return MonitorsConfig.model_validate((json.loads(raw).get("monitors") if raw else None) or {})


def _ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's r of the tie-averaged ranks, as scipy.stats.spearmanr), or None when it
    is undefined (fewer than 3 points, or one side constant). Written here: importing scipy.stats takes seconds."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return round(statistics.correlation(_ranks(xs), _ranks(ys)), 4)


def _distinct(texts: list[str], n: int) -> float | None:
    grams: list[tuple] = []
    for t in texts:
        w = _WORD.findall(t.lower())
        grams += [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        if len(grams) >= DISTINCT_BUDGET:
            break
    grams = grams[:DISTINCT_BUDGET]
    return round(len(set(grams)) / len(grams), 4) if grams else None


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 4) if xs else None


def _quantiles(xs: list[float]) -> dict | None:
    if not xs:
        return None
    q = statistics.quantiles(xs, n=10, method="inclusive") if len(xs) > 1 else [xs[0]] * 9
    return {"min": min(xs), "p10": q[0], "median": statistics.median(xs), "p90": q[8], "max": max(xs),
            "mean": statistics.fmean(xs)}


def _prompts(reg: Registry, sid: str | None) -> dict:
    rows = reg.rows("SELECT coalesce(drop_reason, 'kept') AS k, count(*) AS n FROM prompts "
                    "WHERE stage_run_id = ? GROUP BY ALL ORDER BY k", [sid])
    by = {r["k"]: r["n"] for r in rows}
    kept = by.pop("kept", 0)
    return {"prompts_made": sum(by.values()) + kept if sid else None, "prompts_kept": kept if sid else None,
            "prompts_dropped": by}


# `len(text.split())` in SQL: the runs of anything but Python's str.isspace() characters. Regular expressions are
# slow, so ASCII texts without the separators \x1c-\x1f (strlen counts bytes, length characters) are split on spaces.
_SPACE = r"[\t-\r\x1c-\x1f\x85\p{Z}]"
_ASCII_SPACED = "text"
for _c in range(9, 14):  # \t \n \v \f \r as spaces
    _ASCII_SPACED = f"replace({_ASCII_SPACED}, chr({_c}), ' ')"
_RARE_ASCII = " OR ".join(f"contains(text, chr({c}))" for c in range(28, 32))  # \x1c-\x1f
WORDS_SQL = f"""CASE WHEN strlen(text) = length(text) AND NOT ({_RARE_ASCII})
    THEN len(list_filter(string_split({_ASCII_SPACED}, ' '), lambda w: w <> ''))
    ELSE len(regexp_extract_all(text, '[^{_SPACE[1:]}+')) END"""

CANDIDATES_SQL = f"""
SELECT count(*) FILTER (WHERE $model_in IS NULL OR model_id = $model_in) AS n,
       count(*) FILTER (WHERE $model_in IS NOT NULL AND model_id IS DISTINCT FROM $model_in) AS anchored,
       avg(num_tokens) FILTER (WHERE $model_in IS NULL OR model_id = $model_in) AS mean_tokens,
       avg({WORDS_SQL}) FILTER (WHERE $model_in IS NULL OR model_id = $model_in) AS mean_words
FROM candidates WHERE stage_run_id = $sid
"""


def _texts(reg: Registry, sid: str | None, model_in: str | None) -> list[str]:
    """M_t's first texts in candidate_id order, fetched in growing chunks until they hold DISTINCT_BUDGET word
    2-grams (so also 1-grams): all `_distinct` reads of them."""
    texts: list[str] = []
    grams, chunk = 0, 1_000
    while grams < DISTINCT_BUDGET:
        rows = reg.con.execute(
            "SELECT text FROM candidates WHERE stage_run_id = $sid AND ($model_in IS NULL OR model_id = $model_in) "
            "ORDER BY candidate_id LIMIT $n OFFSET $o",
            {"sid": sid, "model_in": model_in, "n": chunk, "o": len(texts)}).fetchall()
        texts += [r[0] for r in rows]
        grams += sum(max(len(_WORD.findall(r[0].lower())) - 1, 0) for r in rows)
        if len(rows) < chunk:
            break
        chunk *= 2
    return texts


def _candidates(reg: Registry, sid: str | None, model_in: str | None) -> dict:
    """M_t's candidates: count, length, diversity. With temporal anchoring the stage also holds the anchor model's
    (M1's) candidates: counted apart (`anchor_candidates`), and kept out of M_t's figures."""
    r = reg.rows(CANDIDATES_SQL, {"sid": sid, "model_in": model_in})[0]
    texts = _texts(reg, sid, model_in)
    return {"candidates": r["n"] if sid else None, "anchor_candidates": r["anchored"],
            "mean_tokens": None if r["mean_tokens"] is None else round(r["mean_tokens"], 4),
            "mean_words": None if r["mean_words"] is None else round(r["mean_words"], 4),
            "distinct_1": _distinct(texts, 1), "distinct_2": _distinct(texts, 2)}


# The rows (n) of `pairs` and the Spearman's rho of their (x, y), as `spearman`: Pearson's r of the tie-averaged ranks,
# NULL when fewer than 3 rows or one side constant. Appended to the CTEs that define `pairs`.
SPEARMAN_SQL = """
SELECT count(*) AS n,
       CASE WHEN count(*) >= 3 AND count(DISTINCT x) >= 2 AND count(DISTINCT y) >= 2 THEN corr(rx, ry) END AS rho
FROM (SELECT x, y, rank() OVER (ORDER BY x) + (count(*) OVER (PARTITION BY x) - 1) / 2 AS rx,
             rank() OVER (ORDER BY y) + (count(*) OVER (PARTITION BY y) - 1) / 2 AS ry FROM pairs)
"""

# The judge's totals, and each scored candidate's mean over its valid samples (`means`): count, mean, histogram.
JUDGE_SQL = """
WITH j AS (SELECT candidate_id, score FROM judgments WHERE stage_run_id = $sid),
means AS (SELECT avg(score) AS m FROM j WHERE score IS NOT NULL GROUP BY candidate_id)
SELECT (SELECT count(*) FROM j) AS samples, (SELECT count(*) FROM j WHERE score IS NULL) AS failures,
       (SELECT count(*) FROM means) AS scored, (SELECT avg(m) FROM means) AS mean,
       (SELECT list(n ORDER BY bin) FROM (SELECT bin, count(*) FILTER (WHERE m IS NOT NULL) AS n
            FROM range($bins) b(bin) LEFT JOIN
                 (SELECT m, CASE WHEN m >= 0 THEN least(floor(m * 2), $bins - 1) ELSE 0 END AS b FROM means)
                 ON b = bin GROUP BY bin)) AS hist
"""
# Parse errors and valid sample scores, each with its count.
JUDGE_COUNTS_SQL = """
SELECT score, parse_error, count(*) AS n FROM judgments WHERE stage_run_id = $sid
GROUP BY ALL ORDER BY score NULLS FIRST, parse_error NULLS FIRST
"""
# The judge against itself: the first two valid samples (by sample_index) of each candidate with two or more.
SELF_AGREEMENT_SQL = """
WITH firsts AS (SELECT list(score ORDER BY sample_index) AS s FROM judgments
                WHERE stage_run_id = $sid AND score IS NOT NULL GROUP BY candidate_id HAVING count(*) >= 2),
pairs AS (SELECT s[1] AS x, s[2] AS y FROM firsts)
""" + SPEARMAN_SQL


def _judge(reg: Registry, sid: str | None) -> dict:
    """The judge's figures."""
    r = reg.rows(JUDGE_SQL, {"sid": sid, "bins": len(SCORE_BINS) - 1})[0]
    errors: dict[str, int] = {}
    counts: dict[str, int] = {}
    for c in reg.rows(JUDGE_COUNTS_SQL, {"sid": sid}):
        if c["score"] is None:
            errors[c["parse_error"]] = errors.get(c["parse_error"], 0) + c["n"]
        else:
            counts[f"{c['score']:g}"] = counts.get(f"{c['score']:g}", 0) + c["n"]
    rho = reg.rows(SELF_AGREEMENT_SQL, {"sid": sid})[0]["rho"]
    return {
        "judge_samples": r["samples"] if sid else None, "parse_failures": r["failures"] if sid else None,
        "parse_failure_rate": round(r["failures"] / r["samples"], 4) if r["samples"] else None,
        "parse_errors": dict(sorted(errors.items())), "scored_candidates": r["scored"],
        "mean_score": None if r["mean"] is None else round(r["mean"], 4),
        "candidate_score_hist": [[lo, hi, n] for lo, hi, n in zip(SCORE_BINS, SCORE_BINS[1:], r["hist"])],
        "sample_score_counts": dict(sorted(counts.items(), key=lambda kv: float(kv[0]))),
        "judge_self_agreement": None if rho is None else round(rho, 4),
    }


# Rewards of this iteration's candidates (written by any stage of the run's iteration): per signal, the candidates
# and their mean (one value per candidate).
REWARDS_SQL = """
SELECT signal, count(*) AS n, avg(value) AS mean FROM (
    SELECT signal, candidate_id, any_value(value) AS value FROM rewards WHERE value IS NOT NULL
      AND stage_run_id IN (SELECT stage_run_id FROM run_stages WHERE run_id = $run_id AND iteration = $t)
      AND candidate_id IN (SELECT candidate_id FROM candidates WHERE stage_run_id = $gen)
    GROUP BY ALL)
GROUP BY signal ORDER BY signal
"""
# The judge (each candidate's mean valid score) against the coherent reward, over the candidates with both.
AGREEMENT_SQL = """
WITH means AS (SELECT candidate_id, avg(score) AS x FROM judgments WHERE stage_run_id = $judge AND score IS NOT NULL
               GROUP BY candidate_id),
coherent AS (SELECT candidate_id, any_value(value) AS y FROM rewards WHERE value IS NOT NULL AND signal = 'coherent'
               AND stage_run_id IN (SELECT stage_run_id FROM run_stages WHERE run_id = $run_id AND iteration = $t)
               AND candidate_id IN (SELECT candidate_id FROM candidates WHERE stage_run_id = $gen)
             GROUP BY candidate_id),
pairs AS (SELECT x, y FROM means JOIN coherent USING (candidate_id))
""" + SPEARMAN_SQL


def _rewards(reg: Registry, run_id: str, t: int, gen: str | None, judge: str | None) -> dict:
    """Reward signals of this iteration's candidates (written by any stage of this run's iteration), and the judge's
    agreement with the coherent reward."""
    rows = reg.rows(REWARDS_SQL, {"run_id": run_id, "t": t, "gen": gen})
    signals = {r["signal"]: {"candidates": r["n"], "mean": round(r["mean"], 4)} for r in rows}
    if "coherent" in signals and judge is not None:
        a = reg.rows(AGREEMENT_SQL, {"run_id": run_id, "t": t, "gen": gen, "judge": judge})[0]
    else:
        a = {"n": 0, "rho": None}
    return {"rewards": signals, "agreement": None if a["rho"] is None else round(a["rho"], 4),
            "agreement_candidates": a["n"]}


# The pairs' counts by how the chosen's length compares with the rejected's.
PAIRS_SQL = """
SELECT count(*) AS n, count(*) FILTER (WHERE ch.num_tokens > rj.num_tokens) AS longer,
       count(*) FILTER (WHERE ch.num_tokens = rj.num_tokens) AS equal
FROM pairs pr JOIN candidates ch ON ch.candidate_id = pr.chosen_id
JOIN candidates rj ON rj.candidate_id = pr.rejected_id
WHERE pr.stage_run_id = $sid
"""


def _pairs(reg: Registry, sid: str | None) -> dict:
    """The pairs' count, margins and lengths. The margins come as one column, so their quantiles and mean are
    `statistics`' own."""
    r = reg.rows(PAIRS_SQL, {"sid": sid})[0]
    margins = reg.con.execute(
        "SELECT pr.chosen_score - pr.rejected_score AS margin FROM pairs pr "
        "JOIN candidates ch ON ch.candidate_id = pr.chosen_id JOIN candidates rj ON rj.candidate_id = pr.rejected_id "
        "WHERE pr.stage_run_id = $sid ORDER BY margin", {"sid": sid}).fetchnumpy()["margin"].tolist()
    stats = json.loads(reg.scalar("SELECT stats FROM stage_runs WHERE stage_run_id = ?", [sid]) or "{}")
    unpaired = stats.get("unpaired")  # why prompts made no pair (a number in registries before it was broken down)
    return {"pairs": r["n"] if sid else None, "unpaired": unpaired if isinstance(unpaired, dict) else {},
            "margin": _quantiles(margins), "mean_margin": _mean(margins),
            "longer_chosen_share": round(r["longer"] / r["n"], 4) if r["n"] else None,
            "equal_length_pairs": r["equal"]}


def example_pairs(reg: Registry, pairs_sid: str | None, judge_sid: str | None) -> list[dict]:
    """Up to three of the iteration's pairs, as a reader's sample of what it trained on: with the pairs ordered by
    (margin, pair_id), the last (largest margin), the middle ((n - 1) // 2) and the first (smallest), each once.
    Each with its prompt, the chosen and rejected texts and, per side, the pair's score, the judge's mean over the
    valid samples, one sample's raw text (the first valid one, else the first: a justification ending in "Score: N",
    or the probabilities' JSON in prob mode; None when the judge did not run) and the pair's other signals."""
    rows = reg.rows(EXAMPLES_SQL, {"pairs_sid": pairs_sid, "judge_sid": judge_sid})
    examples = []
    for r in rows:
        signals = json.loads(r["signals"] or "{}")
        role = ("only pair" if r["n"] == 1 else "largest margin" if r["pos"] == r["n"]
                else "smallest margin" if r["pos"] == 1 else "median margin")
        sides = {}
        for side, key in (("chosen", "ch"), ("rejected", "rj")):
            sides[side] = {
                "candidate_id": r[f"{key}_id"], "text": r[f"{key}_text"], "tokens": r[f"{key}_tokens"],
                "score": r[f"{key}_score"], "judge_mean": r[f"{key}_mean"], "judge_valid": r[f"{key}_valid"],
                "judge_samples": r[f"{key}_samples"], "rationale": r[f"{key}_rationale"],
                "rationale_sample": r[f"{key}_sample"], "rationale_score": r[f"{key}_sample_score"],
                "signals": {k: v for k, v in (signals.get(side) or {}).items() if k != "judge"}}
        examples.append({"role": role, "pair_id": r["pair_id"], "margin": r["margin"], "prompt_id": r["prompt_id"],
                         "prompt": r["prompt"], "judged": judge_sid is not None, "weights": signals.get("weights"),
                         "rho": signals.get("rho"), **sides})
    return examples


def _models(reg: Registry, run_id: str, t: int, sids: dict[str, str]) -> dict:
    """The model the iteration started from, and the one its trainer made (with its numeric metrics)."""
    row = reg.rows("SELECT model_in, status FROM iterations WHERE run_id = ? AND iteration = ?", [run_id, t])
    made = reg.rows("SELECT name, kind, metrics FROM models WHERE stage_run_id IN (SELECT unnest(?)) "
                    "ORDER BY created_at", [list(sids.values())])
    metrics = json.loads(made[-1]["metrics"] or "{}") if made else {}
    training = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"status": row[0]["status"] if row else None,
            "model_in": (reg.model(row[0]["model_in"]) or {}).get("name") if row else None,
            "model_out": made[-1]["name"] if made else None, "trainer": made[-1]["kind"] if made else None,
            "training": training, "train_loss": training.get("train_loss")}


def _model_in(reg: Registry, run_id: str, t: int) -> str | None:
    row = reg.rows("SELECT model_in FROM iterations WHERE run_id = ? AND iteration = ?", [run_id, t])
    return row[0]["model_in"] if row else None


def _meta_judge(reg: Registry, sid: str | None) -> dict:
    """The meta-judge's figures (its ledger stats: contrasts, verdicts, parse failures, judge pairs, position bias),
    or {} when it did not run in the iteration."""
    row = reg.rows("SELECT stats FROM stage_runs WHERE stage_run_id = ? AND status = 'done'", [sid]) if sid else []
    stats = json.loads(row[0]["stats"] or "{}") if row else {}
    keys = ("contrasts", "verdicts", "parse_failures", "judge_pairs", "position_bias", "higher_preferred")
    return {"meta_judge": {k: stats.get(k) for k in keys}} if stats else {}


def _process(reg: Registry, reward_sid: str | None, pairs_sid: str | None) -> dict:
    """Process rewards' figures, from the ledger stats of the reward stage (steps, step scores, the step judge's parse
    failures) and of a step-wise pairs stage (the step each pair forked at), or {} when no steps were scored."""
    def stats(sid):
        row = reg.rows("SELECT stats FROM stage_runs WHERE stage_run_id = ? AND status = 'done'", [sid]) if sid else []
        return json.loads(row[0]["stats"] or "{}") if row else {}

    steps = stats(reward_sid).get("steps")
    if not steps:
        return {}
    pairs = stats(pairs_sid)
    return {"process": {**steps, "fork_steps": pairs.get("fork_steps") if pairs.get("mode") == "step" else None}}


def human_agreement(reg: Registry, pairs_sid: str | None) -> dict:
    """Judge vs human, from the review labels of `flywheel browse` on the iteration's pairs (each person's latest
    label of a pair): {"human_labels": {agree, disagree, flag}, "human_agreement": the share of agree among agree +
    disagree}, or {} when nobody labelled any."""
    has = reg.scalar("SELECT count(*) FROM information_schema.tables WHERE table_name = 'pair_labels'")
    rows = reg.rows(
        "SELECT label, count(*) AS n FROM (SELECT l.label FROM pair_labels l JOIN pairs p USING (pair_id) "
        "WHERE p.stage_run_id = ? QUALIFY row_number() OVER (PARTITION BY l.pair_id, l.who "
        "ORDER BY l.created_at DESC, l.label_id DESC) = 1) GROUP BY label", [pairs_sid]) if has and pairs_sid else []
    counts = {k: 0 for k in ("agree", "disagree", "flag")} | {r["label"]: r["n"] for r in rows}
    judged = counts["agree"] + counts["disagree"]
    return {"human_labels": counts, "human_agreement": round(counts["agree"] / judged, 4) if judged else None} \
        if rows else {}


def _iteration(reg: Registry, run_id: str, t: int, sids: dict[str, str]) -> dict:
    return {"iteration": t, "stages": sorted(sids), **_models(reg, run_id, t, sids),
            **_prompts(reg, sids.get("self_instruct")),
            **_candidates(reg, sids.get("generate"), _model_in(reg, run_id, t)), **_judge(reg, sids.get("judge")),
            **_rewards(reg, run_id, t, sids.get("generate"), sids.get("judge")), **_pairs(reg, sids.get("pairs")),
            **_meta_judge(reg, sids.get("meta_judge")), **_process(reg, sids.get("reward"), sids.get("pairs")),
            **human_agreement(reg, sids.get("pairs")),
            "examples": example_pairs(reg, sids.get("pairs"), sids.get("judge"))}


def collect(reg: Registry, run_id: str) -> list[dict]:
    """One dict of figures per iteration >= 1 of `run_id`, oldest first, each with `delta` from the one before."""
    sids: dict[int, dict[str, str]] = {}
    for r in reg.rows("SELECT iteration, stage, stage_run_id FROM run_stages WHERE run_id = ? AND iteration >= 1",
                      [run_id]):
        sids.setdefault(r["iteration"], {})[r["stage"]] = r["stage_run_id"]
    iterations = [_iteration(reg, run_id, t, sids[t]) for t in sorted(sids)]
    for prev, it in zip([None, *iterations], iterations):
        it["delta"] = {k: (None if prev is None or it[k] is None or prev[k] is None else round(it[k] - prev[k], 4))
                       for k, _, _ in MAIN}
    return iterations


# --- rendering ------------------------------------------------------------------------------------------------------
def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _delta(value, fmt: str) -> str:
    """A change in brackets: percentage points for shares, else a signed number."""
    if value is None:
        return ""
    if "%" in fmt:
        return f" ({100 * value:+.1f} pt)"
    return f" ({value:+.3g})"


def main_grid(iterations: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The main figures as rows (figure, iteration 1, iteration 2, ...); each cell shows its change in brackets."""
    header = ["", *(f"iteration {it['iteration']} ({it['model_in'] or '?'} -> {it['model_out'] or '?'})"
                    for it in iterations)]
    rows = []
    for key, label, fmt in MAIN:
        rows.append([label, *(_fmt(it[key], fmt) + _delta(it["delta"][key], fmt) for it in iterations)])
    return header, rows


def detail_lines(it: dict) -> list[str]:
    """What does not fit the main grid: drop reasons, parse errors, margins, rewards, training metrics."""
    lines = []
    if it["prompts_made"] is not None:
        dropped = ", ".join(f"{k} {v}" for k, v in it["prompts_dropped"].items()) or "none"
        lines.append(f"prompts: {it['prompts_made']} made, {it['prompts_kept']} kept; dropped: {dropped}")
    if it.get("anchor_candidates"):
        lines.append(f"candidates: {it['candidates']} from {it['model_in']} (the figures above), "
                     f"{it['anchor_candidates']} from the anchor model (the pairs' rejected side)")
    if it["judge_samples"] is not None:
        errs = ", ".join(f"{k} {v}" for k, v in it["parse_errors"].items()) or "none"
        scores = ", ".join(f"{k}: {v}" for k, v in it["sample_score_counts"].items()) or "none"
        lines.append(f"judge: {it['judge_samples']} samples, {it['scored_candidates']} candidates scored; "
                     f"parse failures: {errs}; sample scores {scores}")
    if it.get("meta_judge"):
        mj = it["meta_judge"]
        lines.append(f"meta-judge: {mj['contrasts']} candidates with contrasting judgments, {mj['verdicts']} "
                     f"verdicts ({mj['parse_failures']} unparsed), {mj['judge_pairs']} judge-preference pairs (the "
                     f"higher-scored judgment preferred in {mj['higher_preferred']}); {mj['position_bias']} "
                     "candidates whose verdict flipped with the order")
    if it.get("process"):
        pr = it["process"]
        per = "; ".join(f"{k}: mean {_fmt(v['mean'], '{:.3f}')} over {v['scored']} of {v['steps']} steps"
                        for k, v in pr["signals"].items())
        fails = ", ".join(f"{k} {v}" for k, v in pr.get("judge_parse_failures", {}).items())
        forks = ", ".join(f"step {k}: {v}" for k, v in sorted((pr.get("fork_steps") or {}).items(),
                                                                  key=lambda kv: int(kv[0])))
        lines.append(f"process rewards: {pr['steps']} steps over {pr['candidates']} candidates "
                     f"({_fmt(pr['mean_steps'], '{:.2f}')} each); {per}"
                     + (f"; step-judge parse failures: {fails}" if fails else "")
                     + (f"; step-wise pairs forked at {forks}" if forks else ""))
    if it.get("human_labels"):
        h, share = it["human_labels"], it["human_agreement"]
        lines.append(f"human review (`flywheel browse`): agreed with the judge on {_fmt(share, '{:.0%}')} of "
                     f"{h['agree'] + h['disagree']} labelled pairs; {h['flag']} flagged")
    if it["margin"]:
        m = it["margin"]
        lines.append(f"pair margins: min {m['min']:.2f}, p10 {m['p10']:.2f}, median {m['median']:.2f}, "
                     f"p90 {m['p90']:.2f}, max {m['max']:.2f}; {it['equal_length_pairs']} pairs of equal length")
    if it["unpaired"]:
        why = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in it["unpaired"].items() if v) or "none"
        lines.append(f"prompts without a pair: {why}")
    if it["distinct_1"] is not None:
        lines.append(f"diversity: distinct-1 {it['distinct_1']:.3f}, distinct-2 {_fmt(it['distinct_2'], '{:.3f}')}")
    for signal, r in it["rewards"].items():
        lines.append(f"reward {signal}: {r['candidates']} candidates, mean {_fmt(r['mean'], '{:.4g}')}")
    if it["rewards"].get("coherent"):
        lines.append(f"judge vs coherent: Spearman {_fmt(it['agreement'], '{:+.3f}')} over "
                     f"{it['agreement_candidates']} candidates")
    if it["training"]:
        lines.append(f"training ({it['trainer']}): " + ", ".join(f"{k} {v:.4g}" for k, v in it["training"].items()))
    return lines


def _clip(text: str | None, limit: int = CLIP) -> str:
    """`text` on one line (runs of white space as one space), cut to `limit` characters with an ellipsis."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def _signals(values: dict) -> str:
    return ", ".join(f"{k} {_fmt(v, '{:.4g}') if isinstance(v, (int, float)) else v}" for k, v in values.items())


def side_line(ex: dict, side: str) -> str:
    """What scored one side of an example pair: the judge's mean, the other signals, and the pair's score when it is
    not the judge's mean (several signals weighted, or no judge)."""
    s = ex[side]
    parts = []
    if ex["judged"]:
        parts.append(f"judge mean {_fmt(s['judge_mean'], '{:.2f}')} over {s['judge_valid'] or 0} valid of "
                     f"{s['judge_samples'] or 0} samples")
    if s["signals"]:
        parts.append(_signals(s["signals"]))
    if s["judge_mean"] is None or abs(s["score"] - s["judge_mean"]) > 1e-9:
        parts.append(f"pair score {_fmt(s['score'], '{:.3g}')}")
    return "; ".join(parts)


def _role(ex: dict) -> str:
    """'largest margin 4.00', or 'only pair, margin 4.00'."""
    return f"{ex['role']}{'' if 'margin' in ex['role'] else ', margin'} {ex['margin']:.2f}"


def _rationale_label(s: dict) -> str:
    verdict = "no verdict" if s["rationale_score"] is None else f"score {s['rationale_score']:g}"
    return f"judge sample {s['rationale_sample']} ({verdict})"


def examples_table(it: dict) -> Table | None:
    """The iteration's example pairs as a rich table, each text on one line cut to CLIP characters."""
    examples = it.get("examples") or []
    if not examples:
        return None
    table = Table(title=f"example pairs, iteration {it['iteration']} ({len(examples)} of {it['pairs']} pairs)",
                  show_lines=True)
    for h in ("pair", "prompt", "chosen", "rejected"):
        table.add_column(h, overflow="fold")
    for ex in examples:
        cells = []
        for side in ("chosen", "rejected"):
            s = ex[side]
            cell = Text(_clip(s["text"]))
            cell.append(f"\n{side_line(ex, side)}", style="dim")
            if s["rationale"] is not None:
                cell.append(f"\n{_rationale_label(s)}: ", style="dim")
                cell.append(_clip(s["rationale"]))
            cells.append(cell)
        table.add_row(Text(f"{_role(ex)}\n{ex['pair_id']}"), Text(_clip(ex["prompt"])), *cells)
    return table


def _fence(text: str | None, info: str = "text") -> list[str]:
    """`text` verbatim in a fenced block: the fence is a run of backticks longer than any run in the text, so no
    line of the text can close it (CommonMark)."""
    text = text or ""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{info}", *text.removesuffix("\n").split("\n"), fence]


def examples_md(it: dict) -> list[str]:
    """The iteration's example pairs in Markdown: full texts, scores and judge rationales."""
    examples = it.get("examples") or []
    if not examples:
        return []
    lines = ["", f"#### Example pairs, iteration {it['iteration']}", "",
             ("The iteration's only pair." if it["pairs"] == 1 else
              f"{len(examples)} of the iteration's {it['pairs']} pairs, by margin: "
              f"{', '.join(ex['role'].split()[0] for ex in examples)} (ties broken by pair id).")
             + ("" if examples[0]["judged"] else " The judge did not run in this iteration: signals only.")]
    for ex in examples:
        lines += ["", f"##### {_role(ex).capitalize()} (pair `{ex['pair_id']}`)", "",
                  "**Prompt**", "", *_fence(ex["prompt"])]
        for side in ("chosen", "rejected"):
            s = ex[side]
            lines += ["", f"**{side.capitalize()}** ({side_line(ex, side)})", "", *_fence(s["text"])]
            if s["rationale"] is not None:
                lines += ["", f"{_rationale_label(s).capitalize()}:", "", *_fence(s["rationale"])]
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _checks_md(checks: list[Check]) -> list[str]:
    warn = fired(checks)
    lines = ["## Monitors", ""]
    lines += [f"- **WARNING {c.name}** ({c.failure_mode}), iteration {c.iteration}: {c.message}" for c in warn]
    if not warn:
        lines.append("No monitor fired.")
    its = sorted({c.iteration for c in checks})
    names = list(dict.fromkeys(c.name for c in checks))
    status = {(c.name, c.iteration): c.status for c in checks}
    lines += ["", *_md_table(["check", *(f"iteration {t}" for t in its)],
                             [[n, *(status[(n, t)] for t in its)] for n in names])]
    return lines


def render_markdown(run_id: str, iterations: list[dict], checks: list[Check], bootstrap: str | None = None,
                    images: dict[str, str] | None = None, status: str | None = None) -> str:
    """The report as Markdown; `images` maps 'curves' and 'scores-<t>' to image paths relative to the file;
    `status` (`status_sentence`) says that the run failed or has not finished."""
    images = images or {}
    lines = [f"# Report: run {run_id}", ""]
    if status:
        lines += [f"**{status}**", ""]
    if bootstrap:
        lines += [f"Iteration 0: {bootstrap}.", ""]
    if not iterations:
        return "\n".join(lines + ["No iteration has started yet."]) + "\n"
    lines += _checks_md(checks)
    lines += ["", "## Per iteration", "", "Changes from the previous iteration in brackets.", ""]
    lines += _md_table(*main_grid(iterations))
    if "curves" in images:
        lines += ["", f"![curves over iterations]({images['curves']})"]
    for it in iterations:
        lines += ["", f"### Iteration {it['iteration']}", ""]
        lines += [f"- {line}" for line in detail_lines(it)]
        image = images.get(f"scores-{it['iteration']}")
        if image:
            lines += ["", f"![judge scores, iteration {it['iteration']}]({image})"]
        lines += examples_md(it)
    return "\n".join(lines) + "\n"


# --- plots (matplotlib's object API on the Agg canvas: no pyplot, no global backend) -------------------------------
def _series(iterations: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(it["iteration"], it[key]) for it in iterations if it.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _panel(ax, iterations: list[dict], title: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_xticks([it["iteration"] for it in iterations])
    ax.set_xlim(iterations[0]["iteration"] - 0.5, iterations[-1]["iteration"] + 0.5)
    ax.grid(alpha=0.3)


def _line(ax, iterations: list[dict], key: str, label: str, color: str, scale: float = 1.0, marker: str = "o"):
    xs, ys = _series(iterations, key)
    if xs:
        return ax.plot(xs, [y * scale for y in ys], marker=marker, color=color, label=label, linewidth=2)[0]
    return None


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}", transform=ax.transAxes, ha="center", va="center", color="grey", fontsize=11)


def plot_curves(iterations: list[dict], path: Path, title: str = "") -> Path:
    """Six panels over iterations: judge score, parse failures, length, pairs and margin, agreement, train loss."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 8))  # fixed margins: a layout engine doubles the time a run's end spends here
    fig.subplots_adjust(left=0.05, right=0.95, bottom=0.07, top=0.92, wspace=0.38, hspace=0.32)
    (a, b, c), (d, e, f) = fig.subplots(2, 3)
    _panel(a, iterations, "mean judge score", "points (0-5)")
    a.set_ylim(0, 5)
    if not _line(a, iterations, "mean_score", "mean judge score", "tab:blue"):
        _no_data(a, "judge scores")

    _panel(b, iterations, "judge parse failures", "% of judge samples")
    b.set_ylim(0, 100)
    if not _line(b, iterations, "parse_failure_rate", "parse failures", "tab:red", 100):
        _no_data(b, "judge samples")

    _panel(c, iterations, "mean response length", "tokens")
    c2 = c.twinx()
    c2.set_ylabel("words")
    lines = [_line(c, iterations, "mean_tokens", "tokens", "tab:purple"),
             _line(c2, iterations, "mean_words", "words", "tab:olive", marker="s")]
    if any(lines):  # headroom above the data for a legend that covers neither axis's line
        c.legend(handles=[x for x in lines if x], loc="upper center", ncol=2, fontsize=9)
        for ax, key in ((c, "mean_tokens"), (c2, "mean_words")):
            ax.set_ylim(0, 1.35 * max(_series(iterations, key)[1] or [1]) or 1)
    else:
        _no_data(c, "candidates")

    _panel(d, iterations, "pairs and their margin", "pairs")
    xs, ys = _series(iterations, "pairs")
    if xs:
        bars = d.bar(xs, ys, width=0.5, color="tab:cyan", alpha=0.6, label="pairs")
        d.bar_label(bars, fontsize=9)
        d.set_ylim(0, 1.35 * max(ys) or 1)
        d2 = d.twinx()
        d2.set_ylabel("score margin (chosen - rejected)")
        m = [(it["iteration"], it["margin"]) for it in iterations if it.get("margin")]
        if m:
            d2.errorbar([t for t, _ in m], [q["median"] for _, q in m],
                        yerr=[[q["median"] - q["p10"] for _, q in m], [q["p90"] - q["median"] for _, q in m]],
                        color="tab:orange", marker="D", capsize=5, linewidth=2, label="median margin (p10-p90)")
            d2.set_ylim(0, 1.35 * max(q["p90"] for _, q in m) or 1)
            d2.legend(handles=[bars, *d2.get_legend_handles_labels()[0]], loc="upper center", ncol=2, fontsize=9)
    else:
        _no_data(d, "pairs")

    _panel(e, iterations, "judge agreement (Spearman)", "rank correlation")
    e.set_ylim(-1.05, 1.05)
    e.axhline(0, color="grey", linewidth=1)
    lines = [_line(e, iterations, "agreement", "with the coherent reward", "tab:green"),
             _line(e, iterations, "judge_self_agreement", "with itself (two samples)", "tab:gray", marker="s")]
    if any(lines):
        e.legend(handles=[x for x in lines if x], loc="best", fontsize=9)
    else:
        _no_data(e, "agreement measured")

    _panel(f, iterations, "training loss", "train loss")
    if not _line(f, iterations, "train_loss", "train loss", "tab:brown"):
        _no_data(f, "trained model yet")
    if title:
        fig.suptitle(title, fontsize=13)
    fig.savefig(path, dpi=100)
    return path


def plot_scores(it: dict, path: Path) -> Path:
    """Iteration `it`'s judge scores: candidates' mean scores (left) and every raw sample (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.13, top=0.85, wspace=0.2)
    left, right = fig.subplots(1, 2)
    hist = it["candidate_score_hist"]
    left.bar([lo for lo, _, _ in hist], [n for _, _, n in hist], width=0.5, align="edge", color="tab:blue",
             edgecolor="white")
    left.set_xticks(SCORE_BINS)
    left.set_xlim(0, 5)
    left.set_title(f"mean score per candidate ({it['scored_candidates']} candidates)", fontsize=11)
    left.set_xlabel("mean of the valid judge samples")
    left.set_ylabel("candidates")
    counts = it["sample_score_counts"]
    scores = sorted({*(str(v) for v in range(6)), *counts}, key=float)  # every point of the rubric, even if unused
    labels = [*scores, "no verdict"]
    values = [*(counts.get(v, 0) for v in scores), it["parse_failures"] or 0]
    colors = ["tab:blue"] * len(scores) + ["tab:red"]
    right.bar(range(len(labels)), values, color=colors, edgecolor="white")
    right.set_xticks(range(len(labels)), labels)
    right.set_title(f"judge samples ({it['judge_samples']})", fontsize=11)
    right.set_xlabel("score")
    right.set_ylabel("samples")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"iteration {it['iteration']}: judge scores", fontsize=13)
    fig.savefig(path, dpi=100)
    return path


def bootstrap_sentence(reg: Registry, run_id: str) -> str | None:
    """Iteration 0 in one sentence: seeds, base model, M1 (None before the run has any)."""
    rows = reg.rows("SELECT rs.stage, s.stats, epoch(s.finished_at) - epoch(s.started_at) AS seconds "
                    "FROM run_stages rs JOIN stage_runs s USING (stage_run_id) "
                    "WHERE rs.run_id = ? AND rs.iteration = 0", [run_id])
    if not rows:
        return None
    s = {r["stage"]: json.loads(r["stats"] or "{}") for r in rows}
    sft, base = s.get("sft", {}), s.get("base", {})
    params = f" ({base['parameters']:,} parameters)" if "parameters" in base else ""
    loss = f", loss {sft['train_loss']:.3f}" if "train_loss" in sft else ""
    seconds = sum(r["seconds"] or 0.0 for r in rows)
    return (f"{s.get('seeds', {}).get('seeds', '?')} seeds; PT{params} -> M1 by SFT on {sft.get('ift', '?')} IFT + "
            f"{sft.get('eft', 0)} EFT examples{loss} ({seconds:.0f} s)")


def status_sentence(reg: Registry, run_id: str) -> str | None:
    """None for a run that finished; else that it failed (or is running, or was killed), where it stopped and why."""
    status = reg.scalar("SELECT status FROM runs WHERE run_id = ?", [run_id])
    if status in (None, "done"):
        return None
    stopped = reg.rows("SELECT rs.iteration, rs.stage, s.status, s.error FROM run_stages rs "
                       "JOIN stage_runs s USING (stage_run_id) WHERE rs.run_id = ? AND s.status != 'done' "
                       "ORDER BY s.started_at LIMIT 1", [run_id])
    head = ("This run FAILED" if status == "failed" else
            "This run has not finished (it is running, or was killed)")
    if stopped:
        s = stopped[0]
        error = (s["error"] or "").strip().splitlines()
        head += f": it stopped in {s['stage']} (iteration {s['iteration']})" + (f": {error[0]}" if error else "")
    return head + ". The figures below cover what finished; `flywheel resume` resumes it."


def models_of(reg: Registry, run_id: str) -> list[dict]:
    """The run's models (PT, M1, M2, ...) with their folders, oldest first."""
    return reg.rows("SELECT m.name, m.path FROM models m WHERE m.stage_run_id IN "
                    "(SELECT stage_run_id FROM run_stages WHERE run_id = ?) ORDER BY m.iteration, m.created_at",
                    [run_id])


def markdown(reg: Registry, run_id: str) -> str:
    """The report as one Markdown string without images: for `prefect.artifacts.create_markdown_artifact`."""
    iterations = collect(reg, run_id)
    checks = evaluate(iterations, monitors_config(reg, run_id))
    text = render_markdown(run_id, iterations, checks, bootstrap_sentence(reg, run_id),
                           status=status_sentence(reg, run_id))
    return text + f"\nFull report with plots: `{report_dir(reg, run_id) / 'report.md'}`\n"


def warnings_for(reg: Registry, run_id: str, iteration: int) -> list[Check]:
    """The monitors that fire on `iteration` of a run (evaluated after each iteration; the report lists all)."""
    return [c for c in fired(evaluate(collect(reg, run_id), monitors_config(reg, run_id))) if c.iteration == iteration]


def report_dir(reg: Registry, run_id: str) -> Path:
    return reg.root / "runs" / run_id


def write(reg: Registry, run_id: str) -> tuple[list[dict], list[Check], Path]:
    """Write report.md, report.json and the PNG plots under <registry>/runs/<run_id>/."""
    out = report_dir(reg, run_id)
    out.mkdir(parents=True, exist_ok=True)
    iterations = collect(reg, run_id)
    checks = evaluate(iterations, monitors_config(reg, run_id))
    images = {}
    if iterations:
        images["curves"] = plot_curves(iterations, out / "curves.png", f"run {run_id}").name
        for it in iterations:
            if it["judge_samples"]:
                images[f"scores-{it['iteration']}"] = plot_scores(it, out / f"scores-{it['iteration']}.png").name
    path = out / "report.md"
    path.write_text(render_markdown(run_id, iterations, checks, bootstrap_sentence(reg, run_id), images,
                                    status_sentence(reg, run_id)))
    (out / "report.json").write_text(json.dumps(
        {"run_id": run_id, "iterations": iterations,
         "checks": [dict(name=c.name, iteration=c.iteration, status=c.status, failure_mode=c.failure_mode,
                         message=c.message) for c in checks]}, indent=2, default=str))
    return iterations, checks, path


def print_report(run_id: str, iterations: list[dict], checks: list[Check], console: Console | None = None,
                 bootstrap: str | None = None, status: str | None = None) -> None:
    console = console or Console()
    if status:
        console.print(f"[bold red]{status}[/]", highlight=False, soft_wrap=True)
    if bootstrap:
        console.print(f"Iteration 0: {bootstrap}")
    if not iterations:
        console.print(f"run {run_id}: no iteration has started yet")
        return
    console.print(grid_table(f"flywheel report: run {run_id}", *main_grid(iterations)))
    for it in iterations:
        console.print(f"[bold]iteration {it['iteration']}[/]")
        for line in detail_lines(it):
            console.print(f"  {line}", highlight=False, soft_wrap=True)
        table = examples_table(it)
        if table is not None:
            console.print(table)
    its = sorted({c.iteration for c in checks})
    mon = Table(title="monitors")
    mon.add_column("check", no_wrap=True)
    mon.add_column("failure mode")
    for t in its:
        mon.add_column(f"iteration {t}")
    style = {"WARN": "[bold red]WARN[/]", "ok": "[green]ok[/]", "n/a": "[dim]n/a[/]"}
    status = {(c.name, c.iteration): c.status for c in checks}
    for name in dict.fromkeys(c.name for c in checks):
        mode = next(c.failure_mode for c in checks if c.name == name)
        mon.add_row(name, mode, *(style[status[(name, t)]] for t in its))
    console.print(mon)
    for c in fired(checks):
        console.print(f"[bold red]WARNING[/] {c.name} ({c.failure_mode}), iteration {c.iteration}: {c.message}",
                      highlight=False, soft_wrap=True)
