"""Pairs at scale: 1,000,000 judged candidates -> best/worst pairs + the frozen training set, DuckDB against pandas.

    python bench/pairs.py               # 250,000 prompts x 4 candidates x 3 judge samples (1M candidates, 3M samples)
    python bench/pairs.py --smoke       # 2,500 prompts

Synthetic rows (scores 0-5, one judge sample in 20 a parse failure, ~100-character texts) are written into a real
registry file. The project's own pairs stage (`flywheel.stages.pairs.build_pairs`: its SQL, stats, ledger and the dataset
versions it freezes, "pairs" and "train") runs on them, timed as a whole and in parts (its statement and the freeze are
timed by wrapping `flywheel.stages.pairs.select_pairs` and `flywheel.stage.freeze_stage_outputs`, so what is timed is the
code the stage runs). The baseline does the same selection with pandas (mean of the valid samples per candidate, then
per prompt the best and worst with ties broken by candidate id, a sha256 pair id, the texts joined) from DataFrames
already in memory, and writes the same training table (prompt, chosen, rejected, then ids and scores, in pair id
order) as zstd Parquet. Both must choose exactly the same pairs, and so must a plain arg_max statement (the
statement's shape before combined signals and length control), timed for reference.
Goal: the whole build_pairs call <= 1.5 s and >= 3x pandas.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import tempfile
import time
from pathlib import Path

from _common import print_table, ratio

SID = "judge-bench"

# The statement's shape before pairs learned combined signals and length control: judge only, best vs worst.
PLAIN_SQL = f"""
CREATE TEMP TABLE plain_pairs AS
WITH scored AS (
    SELECT c.prompt_id, c.candidate_id, avg(j.score) AS score
    FROM candidates c JOIN judgments j USING (candidate_id)
    WHERE j.stage_run_id = '{SID}' AND j.score IS NOT NULL GROUP BY ALL
), extremes AS (
    SELECT prompt_id, arg_max(candidate_id, (score, candidate_id)) AS chosen_id, max(score) AS chosen_score,
           arg_min(candidate_id, (score, candidate_id)) AS rejected_id, min(score) AS rejected_score
    FROM scored GROUP BY prompt_id
)
SELECT 'pr-' || sha256(concat_ws('|', 'plain', prompt_id, chosen_id, rejected_id))[:16] AS pair_id, *
FROM extremes WHERE chosen_score - rejected_score > 0
"""
PLAIN_SNAPSHOT_SQL = """
SELECT pr.pair_id, pr.prompt_id, p.text AS prompt, ch.text AS chosen, rj.text AS rejected,
       pr.chosen_score, pr.rejected_score
FROM plain_pairs pr JOIN prompts p USING (prompt_id)
JOIN candidates ch ON ch.candidate_id = pr.chosen_id JOIN candidates rj ON rj.candidate_id = pr.rejected_id
ORDER BY pr.pair_id
"""


def synthesize(reg, prompts: int, n: int, k: int) -> None:
    con = reg.con
    common = "'bench' AS run_id, 1 AS iteration, 'h' AS config_hash, now() AS created_at"
    con.execute(f"""INSERT INTO prompts BY NAME SELECT 'p-' || i AS prompt_id, 'self_instruct' AS source,
        'Write about topic ' || i || ' in a few sentences.' AS text, true AS kept, 'si' AS stage_run_id, {common}
        FROM range({prompts}) t(i)""")
    con.execute(f"""INSERT INTO candidates BY NAME SELECT 'c-' || i AS candidate_id, 'p-' || (i // {n}) AS prompt_id,
        i % {n} AS sample_index, 'Candidate answer ' || i || ': ' || repeat('some words of text ', 4) AS text,
        20 + hash(i, 'len') % 200 AS num_tokens, 'stop' AS finish_reason, 'm' AS model_id,
        'transformers' AS backend, '{{}}' AS sampling, 0 AS seed, 'gen' AS stage_run_id, {common}
        FROM range({prompts * n}) t(i)""")
    con.execute(f"""INSERT INTO judgments BY NAME SELECT 'j-' || i AS judgment_id, 'c-' || (i // {k}) AS candidate_id,
        i % {k} AS sample_index, 'Score: x' AS raw_text,
        CASE WHEN hash(i, 'fail') % 20 = 0 THEN NULL ELSE (hash(i) % 6)::DOUBLE END AS score,
        CASE WHEN hash(i, 'fail') % 20 = 0 THEN 'no_score' END AS parse_error, 'm' AS judge_model_id,
        't' AS template_hash, '{{}}' AS sampling, '{SID}' AS stage_run_id, {common}
        FROM range({prompts * n * k}) t(i)""")
    con.execute("CHECKPOINT")


def pandas_pairs(cands, judgments, prompts, sid: str, out: Path):
    """The same selection as flywheel/stages/pairs.py's statement (rho 0, judge only, min_margin 0), in pandas, and the
    same training table (the train dataset's columns, in pair id order) written as zstd Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = judgments[judgments["score"].notna()].groupby("candidate_id", sort=False)["score"].mean()
    scored = cands.join(scores, on="candidate_id", how="inner").sort_values(["prompt_id", "score", "candidate_id"])
    by_prompt = scored.groupby("prompt_id", sort=False)
    best, worst = by_prompt.tail(1).set_index("prompt_id"), by_prompt.head(1).set_index("prompt_id")
    pairs = best.merge(worst, left_index=True, right_index=True, suffixes=("_ch", "_rj"))
    pairs = pairs[pairs["score_ch"] - pairs["score_rj"] > 0].reset_index()
    pairs["pair_id"] = ["pr-" + hashlib.sha256(f"{sid}|{p}|{c}|{r}".encode()).hexdigest()[:16] for p, c, r in
                        zip(pairs["prompt_id"], pairs["candidate_id_ch"], pairs["candidate_id_rj"])]
    pairs = pairs.merge(prompts, on="prompt_id").sort_values("pair_id")
    table = pa.table({"prompt": pairs["prompt"], "chosen": pairs["text_ch"], "rejected": pairs["text_rj"],
                      "pair_id": pairs["pair_id"], "prompt_id": pairs["prompt_id"],
                      "chosen_id": pairs["candidate_id_ch"], "rejected_id": pairs["candidate_id_rj"],
                      "chosen_score": pairs["score_ch"], "rejected_score": pairs["score_rj"]})
    pq.write_table(table, out, compression="zstd")
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--prompts", type=int, default=None, help="default 250,000 (smoke: 2,500)")
    p.add_argument("--n", type=int, default=4, help="candidates per prompt")
    p.add_argument("--samples", type=int, default=3, help="judge samples per candidate")
    args = p.parse_args()
    prompts_n = args.prompts or (2_500 if args.smoke else 250_000)

    import flywheel.stage
    import flywheel.stages.pairs
    from flywheel.config import load_config
    from flywheel.registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix="flywheel-bench-pairs-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the 1M-candidate registry is ~300 MB
    cfg = load_config(None, [f"registry.root={tmp}"])
    t0 = time.perf_counter()
    with Registry(tmp) as reg:
        synthesize(reg, prompts_n, args.n, args.samples)
        cands = reg.con.sql("SELECT candidate_id, prompt_id, text FROM candidates").df()
        judgments = reg.con.sql("SELECT candidate_id, score FROM judgments").df()
        prompt_texts = reg.con.sql("SELECT prompt_id, text AS prompt FROM prompts").df()
    setup = time.perf_counter() - t0

    parts = {"statement": 0.0, "freeze": 0.0}
    per_version: dict[str, float] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts[name] += time.perf_counter() - t
        return wrapper

    def each_version(fn):
        def wrapper(reg, name, *a, **kw):
            t = time.perf_counter()
            try:
                return fn(reg, name, *a, **kw)
            finally:
                per_version[name] = per_version.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    import flywheel.registry.datasets

    originals = (flywheel.stages.pairs.select_pairs, flywheel.stage.freeze_stage_outputs, flywheel.registry.datasets.freeze_dataset)
    flywheel.stages.pairs.select_pairs = timed("statement", flywheel.stages.pairs.select_pairs)  # pairs + texts table, INSERT
    flywheel.stage.freeze_stage_outputs = timed("freeze", flywheel.stage.freeze_stage_outputs)
    flywheel.registry.datasets.freeze_dataset = each_version(flywheel.registry.datasets.freeze_dataset)
    t0 = time.perf_counter()
    result = flywheel.stages.pairs.build_pairs(cfg, "bench", 1, SID)
    stage = time.perf_counter() - t0
    flywheel.stages.pairs.select_pairs, flywheel.stage.freeze_stage_outputs, flywheel.registry.datasets.freeze_dataset = originals
    work = result.stats["wall_s"]  # the stage's work, ledger and registry open: no dataset freeze
    versions = result.stats["dataset_versions"]

    from flywheel.registry.datasets import read_version

    with Registry(tmp) as reg:
        duck = {(r["prompt_id"], r["chosen_id"], r["rejected_id"]) for r in reg.rows(
            "SELECT prompt_id, chosen_id, rejected_id FROM pairs WHERE stage_run_id = ?", [result.stage_run_id])}
        train = read_version(reg, versions["train"])  # the frozen training set, its content hash checked
        t0 = time.perf_counter()
        reg.con.execute(PLAIN_SQL)
        reg.con.execute(f"COPY ({PLAIN_SNAPSHOT_SQL}) TO '{tmp / 'plain.parquet'}' (FORMAT parquet, COMPRESSION zstd)")
        plain = time.perf_counter() - t0
        plain_pairs = set(reg.con.execute("SELECT prompt_id, chosen_id, rejected_id FROM plain_pairs").fetchall())

    t0 = time.perf_counter()
    frame = pandas_pairs(cands, judgments, prompt_texts, result.stage_run_id, tmp / "pandas.parquet")
    baseline = time.perf_counter() - t0
    theirs = set(zip(frame["prompt_id"], frame["candidate_id_ch"], frame["candidate_id_rj"]))
    if not theirs == duck == plain_pairs:
        raise SystemExit(f"pandas, the plain statement and the project chose different pairs "
                         f"({len(theirs ^ duck)}, {len(plain_pairs ^ duck)} differ): a wrong baseline")
    import pyarrow.parquet as pq

    written = pq.read_table(tmp / "pandas.parquet")
    if not train.cast(written.schema).equals(written):
        raise SystemExit("the frozen train version and pandas' training table differ: a wrong baseline")

    stats = work - parts["statement"]
    rows = [
        ["project pair statement (flywheel.stages.pairs.select_pairs: best/worst, pairs + texts table, INSERT INTO pairs)",
         f"{parts['statement']:.3f}", ratio(baseline, parts["statement"])],
        ["project stats query, registry open, ledger", f"{stats:.3f}", "-"],
        ["project dataset freeze (flywheel/registry/datasets.py: COPY + content hash of each version)",
         f"{parts['freeze']:.3f}", ratio(baseline, parts["freeze"])],
        *[[f"  of which the {name} version", f"{seconds:.3f}", "-"] for name, seconds in per_version.items()],
        ["= build_pairs call, total", f"{stage:.3f}", ratio(baseline, stage)],
        ["reference: plain arg_max statement (judge only) + COPY to Parquet", f"{plain:.3f}", ratio(baseline, plain)],
        ["pandas groupby baseline (selection + ids + texts + Parquet)", f"{baseline:.3f}", "1.00x"],
    ]
    met = stage <= 1.5 and baseline / stage >= 3
    print_table(
        f"Pairs: {prompts_n * args.n:,} judged candidates ({prompts_n:,} prompts x {args.n}, {args.samples} judge "
        f"samples each) -> {len(duck):,} pairs",
        ["path", "seconds", "pandas / this"], rows,
        [f"the same {len(duck):,} pairs chosen by the project, the plain statement and pandas, and the same training "
         f"table frozen ({', '.join(sorted(versions.values()))}) and written by pandas; synthetic data written in "
         f"{setup:.1f} s (not timed)",
         f"goal: whole build_pairs call <= 1.5 s and >= 3x pandas: {'met' if met else 'not met'} "
         f"({stage:.3f} s, {ratio(baseline, stage)})"])


if __name__ == "__main__":
    main()
