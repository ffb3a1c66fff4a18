"""Process rewards at scale: the reward stage with the step rule (steps, step rewards, their aggregate) and step-wise
pairs, against the outcome rule's stage and outcome pairs on the same candidates.

    python bench/process_rewards.py            # 5,000 arithmetic prompts x 8 candidates (40,000), a 100-prompt subset
    python bench/process_rewards.py --smoke    # 40 prompts x 4 (160), a 10-prompt subset

A real registry (a temporary folder) gets P arithmetic prompts drawn from the arithmetic world
(`flywheel.analysis.arithworld`: 2 to 4 operations, the prompt's reference its final value) and n candidates each,
written one operation per line: the true chain, or with probability q (default 0.5) a near miss (`near_miss_chain`:
one step's result off by one or two at a random step, the later steps carried on from the wrong value), so that the
candidates of a prompt share their first steps and part where an error comes in. Then, each timed as a whole call in
this process (registry open, ledger and dataset freeze included), `reward.batch_size=1024`, no coherent reward (no
model is loaded):

- baseline: the reward stage (`flywheel.stages.reward.reward`) with the outcome rule only (`exact_match`);
- process: the same stage with `steps.split=line` and `steps.rule=...arithworld:step_check` (one `steps` row and one
  `step_rewards` row per step and one aggregated `rewards` row per candidate, all written with
  `Registry.insert_many`, an Arrow insert, as the reward stage writes every row);
- every row through executemany (how the reward stage wrote its rows before `insert_many`): the process stage again
  with `Registry.insert_many` replaced by `Registry.insert` for that call only, on a subset of the prompts
  (executemany costs milliseconds a row), beside the
  Arrow path on the same subset; both subsets are copies of the first prompts' candidates under their own
  candidate ids, in the same registry, and must write the same steps and scores;
- pairs (`flywheel.stages.pairs.build_pairs`): outcome pairs from `exact_match` (baseline) against step-wise pairs
  (`pairs.mode=step`) from the step rewards. A sample of the step pairs is checked against the `steps` and
  `step_rewards` rows: both sides share their steps before the fork step, differ at it, the chosen's step score there is
  above the rejected's, and the step rule run again on the texts gives the stored scores. Every candidate's aggregated
  step score (min) must equal its exact match.

Times are compared per 1,000 candidates. The time spent inside `Registry.insert` (executemany) and
`Registry.insert_many` (Arrow) is measured by wrapping them. Executemany costs ~8 ms a row on a busy 2-core machine,
which is why the comparison with it runs on a subset only.
Goal: the process stage <= 3x the outcome rule's stage; step pairs <= 2x outcome pairs.
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from _common import REPO, print_table, ratio

sys.path.insert(0, str(REPO))  # tests.helpers of this tree (its fast Arrow row insert)

RUN = "bench"
OUTCOME_RULE = ('reward.rules=[{name: exact_match, kind: python, '
                'checker: "flywheel.analysis.arithworld:exact_match"}]')
STEP_RULE = "flywheel.analysis.arithworld:step_check"


def synthesize(reg, prompts: int, n: int, q: float, subset: int, seed: int) -> dict:
    """Prompts p-<i> (stage 'si') with references; n candidates each under stage 'gen' (ids c-<i>-<j>), and the first
    `subset` prompts' candidates copied under 'gen-sub-arrow' (a-<i>-<j>) and 'gen-sub-exec' (x-<i>-<j>)."""
    from flywheel.analysis.arithworld import (
        ArithSizes,
        ArithWorld,
        near_miss_chain,
        prompt_of,
        reference_of,
        solution_of,
    )
    from tests.helpers.registry import candidate_row, insert_rows, prompt_row

    world = ArithWorld(ArithSizes(), seed)
    rng = random.Random(f"process-rewards-{seed}")
    seen, problems = set(), []
    while len(problems) < prompts:
        problem = world.draw(rng)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    prompt_rows, cands, wrong = [], [], 0
    for i, problem in enumerate(problems):
        prompt_rows.append(prompt_row(f"p-{i}", prompt_of(problem), "si", reference=reference_of(problem)))
        for j in range(n):
            miss = rng.random() < q
            wrong += miss
            text = near_miss_chain(problem, rng) if miss else solution_of(problem)
            cands.append(candidate_row(f"c-{i}-{j}", f"p-{i}", text, "gen", sample_index=j,
                                       num_tokens=len(text) // 2 + 1))
    copies = [dict(r, candidate_id=f"{tag}-{r['candidate_id'][2:]}", stage_run_id=f"gen-sub-{kind}")
              for tag, kind in (("a", "arrow"), ("x", "exec")) for r in cands[: subset * n]]
    insert_rows(reg, "prompts", prompt_rows)
    insert_rows(reg, "candidates", cands + copies)
    reg.con.execute("CHECKPOINT")
    return {"candidates": len(cands), "near_misses": wrong, "steps": sum(r["text"].count("\n") + 1 for r in cands)}


@contextmanager
def inserts(spent: dict, executemany_steps: bool = False):
    """Time Registry.insert and Registry.insert_many (seconds, rows) into `spent`; with `executemany_steps`,
    insert_many is Registry.insert (executemany) for the duration. Restored on exit."""
    from flywheel.registry import store

    originals = store.Registry.insert, store.Registry.insert_many
    if executemany_steps:
        store.Registry.insert_many = store.Registry.insert

    def timed(name, fn):
        def wrapper(self, table, rows):
            t = time.perf_counter()
            try:
                return fn(self, table, rows)
            finally:
                spent[name][0] += time.perf_counter() - t
                spent[name][1] += len(rows)
        return wrapper

    for name in ("insert", "insert_many"):
        spent[name] = [0.0, 0]
    store.Registry.insert = timed("insert", store.Registry.insert)
    store.Registry.insert_many = timed("insert_many", store.Registry.insert_many)
    try:
        yield spent
    finally:
        store.Registry.insert, store.Registry.insert_many = originals


def written(reg, sid: str) -> dict:
    return {t: reg.scalar(f"SELECT count(*) FROM {t} WHERE stage_run_id = ?", [sid])
            for t in ("rewards", "steps", "step_rewards")}


def check_step_pairs(reg, pairs_sid: str, reward_sid: str, sample: int, seed: int) -> int:
    """Every checked step pair forks where it says: same steps before, different at the fork, the chosen's step score
    above the rejected's there; the stored step scores are the step rule's. Returns how many were checked."""
    from flywheel.analysis.arithworld import step_check

    pairs = reg.rows("SELECT p.chosen_id, p.rejected_id, p.chosen_score, p.rejected_score, p.signals, "
                     "q.text AS prompt, q.reference FROM pairs p JOIN prompts q USING (prompt_id) "
                     "WHERE p.stage_run_id = ? ORDER BY p.pair_id", [pairs_sid])
    picked = random.Random(seed).sample(pairs, min(sample, len(pairs)))
    ids = [x for p in picked for x in (p["chosen_id"], p["rejected_id"])]
    steps: dict[str, list] = {}
    for r in reg.rows("SELECT s.candidate_id, s.step_index, s.text, s.prefix_hash, r.value FROM steps s "
                      "JOIN step_rewards r USING (step_id) WHERE s.stage_run_id = ? AND r.signal = 'step_rule' "
                      "AND s.candidate_id IN (SELECT unnest(?)) ORDER BY s.candidate_id, s.step_index",
                      [reward_sid, ids]):
        steps.setdefault(r["candidate_id"], []).append(r)
    for p in picked:
        ch, rj = steps[p["chosen_id"]], steps[p["rejected_id"]]
        k = json.loads(p["signals"])["chosen"]["step"]
        assert json.loads(p["signals"])["rejected"]["step"] == k, p
        assert [s["text"] for s in ch[:k]] == [s["text"] for s in rj[:k]], f"no shared prefix before step {k}: {p}"
        assert ch[k]["prefix_hash"] == rj[k]["prefix_hash"] and ch[k]["text"] != rj[k]["text"], p
        assert ch[k]["value"] > rj[k]["value"], f"chosen's step {k} does not score above the rejected's: {p}"
        assert (p["chosen_score"], p["rejected_score"]) == (ch[k]["value"], rj[k]["value"]), p
        for side in (ch, rj):
            assert [s["value"] for s in side] == step_check(p["prompt"], p["reference"], [s["text"] for s in side])
    return len(picked)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--prompts", type=int, default=None, help="arithmetic prompts (default 5000; smoke 40)")
    p.add_argument("--n", type=int, default=None, help="candidates per prompt (default 8; smoke 4)")
    p.add_argument("--q", type=float, default=0.5, help="share of candidates that are near misses")
    p.add_argument("--subset", type=int, default=None,
                   help="prompts of the executemany comparison (default 100; smoke 10)")
    p.add_argument("--batch-size", type=int, default=1024, help="reward.batch_size")
    p.add_argument("--check", type=int, default=500, help="step pairs checked against the steps rows")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    prompts_n = args.prompts or (40 if args.smoke else 5000)
    n = args.n or (4 if args.smoke else 8)
    subset = min(args.subset or (10 if args.smoke else 100), prompts_n)

    from flywheel.config import load_config
    from flywheel.registry import Registry
    from flywheel.stages.pairs import build_pairs
    from flywheel.stages.reward import reward

    tmp = Path(tempfile.mkdtemp(prefix="flywheel-bench-process-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    common = [f"registry.root={tmp}", "run.device=cpu", f"reward.batch_size={args.batch_size}"]
    outcome_cfg = load_config(None, [*common, OUTCOME_RULE, "reward.weights={exact_match: 1}"])
    process = [*common, "steps.split=line", f"steps.rule={STEP_RULE}", "reward.weights={step_rule: 1}"]
    process_cfg = load_config(None, process)
    step_pairs_cfg = load_config(None, [*process, "pairs.mode=step"])

    t0 = time.perf_counter()
    with Registry(tmp) as reg:
        made = synthesize(reg, prompts_n, n, args.q, subset, args.seed)
    setup = time.perf_counter() - t0
    total, sub = made["candidates"], subset * n

    def timed_stage(cfg, candidates_sid: str, **patch):
        spent: dict = {}
        with inserts(spent, **patch):
            t = time.perf_counter()
            result = reward(cfg, RUN, 1, candidates_sid, "m-sft", "m-pt", "m-t")
            seconds = time.perf_counter() - t
        assert not result.skipped, "a stage found done: the bench's runs must be distinct stages"
        return result, seconds, spent

    base, base_s, base_ins = timed_stage(outcome_cfg, "gen")
    proc, proc_s, proc_ins = timed_stage(process_cfg, "gen")
    arrow, arrow_s, arrow_ins = timed_stage(process_cfg, "gen-sub-arrow")
    execm, exec_s, exec_ins = timed_stage(process_cfg, "gen-sub-exec", executemany_steps=True)

    t = time.perf_counter()
    outcome_pairs = build_pairs(outcome_cfg, RUN, 1, None, base.stage_run_id)
    outcome_pairs_s = time.perf_counter() - t
    t = time.perf_counter()
    step_pairs = build_pairs(step_pairs_cfg, RUN, 1, None, proc.stage_run_id)
    step_pairs_s = time.perf_counter() - t

    with Registry(tmp) as reg:
        rows = {sid: written(reg, sid) for sid in (base.stage_run_id, proc.stage_run_id, arrow.stage_run_id,
                                                   execm.stage_run_id)}
        mismatch = reg.scalar(
            "SELECT count(*) FROM rewards o JOIN rewards s USING (candidate_id) WHERE o.stage_run_id = ? "
            "AND s.stage_run_id = ? AND o.value IS DISTINCT FROM s.value", [base.stage_run_id, proc.stage_run_id])
        same_cands = reg.scalar("SELECT count(*) FROM rewards o JOIN rewards s USING (candidate_id) "
                                "WHERE o.stage_run_id = ? AND s.stage_run_id = ?",
                                [base.stage_run_id, proc.stage_run_id])
        if mismatch or same_cands != total:
            raise SystemExit(f"the step rule's aggregate (min) differs from exact match on {mismatch} of {same_cands} "
                             f"candidates (of {total})")

        def subset_rows(sid: str) -> list:
            return reg.con.execute(
                "SELECT substr(s.candidate_id, 3), s.step_index, s.text, s.prefix_hash, s.start_char, s.end_char, "
                "r.value FROM steps s JOIN step_rewards r USING (step_id) WHERE s.stage_run_id = ? ORDER BY ALL",
                [sid]).fetchall()

        if subset_rows(arrow.stage_run_id) != subset_rows(execm.stage_run_id):
            raise SystemExit("the Arrow and executemany inserts wrote different steps or step rewards")
        checked = check_step_pairs(reg, step_pairs.stage_run_id, proc.stage_run_id, args.check, args.seed)
        bad_outcome = reg.scalar("SELECT count(*) FROM pairs WHERE stage_run_id = ? AND chosen_score <= rejected_score",
                                 [outcome_pairs.stage_run_id])
    if bad_outcome:
        raise SystemExit(f"{bad_outcome} outcome pairs whose chosen does not score above the rejected")
    if not step_pairs.stats["pairs"] or not checked:
        raise SystemExit("no step pair to check: the synthetic candidates never fork")

    def per_k(seconds: float, count: int) -> float:
        return seconds / count * 1000

    def rows_of(sid: str) -> str:
        r = rows[sid]
        return f"{sum(r.values()):,}" if not (r["steps"] or r["step_rewards"]) else \
            f"{sum(r.values()):,} ({r['rewards']:,} + {r['steps']:,} steps + {r['step_rewards']:,} step rewards)"

    def ins(spent: dict, name: str) -> str:
        return f"{spent[name][0]:.3f} ({spent[name][1]:,} rows)"

    base_k, pairs_k = per_k(base_s, total), per_k(outcome_pairs_s, total)
    table = [
        ["baseline: reward stage, outcome rule (exact_match)", f"{total:,}", f"{base_s:.3f}",
         rows_of(base.stage_run_id), f"{base_k:.3f}", "1.00x"],
        ["  of which Registry.insert_many (Arrow: rewards)", "", ins(base_ins, "insert_many"), "", "", ""],
        ["process: reward stage, step rule (steps.split=line), rows by insert_many (Arrow)", f"{total:,}",
         f"{proc_s:.3f}", rows_of(proc.stage_run_id), f"{per_k(proc_s, total):.3f}",
         ratio(per_k(proc_s, total), base_k)],
        ["  of which Registry.insert_many (Arrow: rewards, steps, step_rewards)", "", ins(proc_ins, "insert_many"),
         "", "", ""],
        [f"process, subset of {subset:,} prompts, rows by insert_many (Arrow)", f"{sub:,}", f"{arrow_s:.3f}",
         rows_of(arrow.stage_run_id), f"{per_k(arrow_s, sub):.3f}", ratio(per_k(arrow_s, sub), base_k)],
        ["  of which Registry.insert_many (Arrow: rewards, steps, step_rewards)", "", ins(arrow_ins, "insert_many"),
         "", "", ""],
        [f"process, subset of {subset:,} prompts, every row by Registry.insert (executemany; insert_many patched)",
         f"{sub:,}", f"{exec_s:.3f}", rows_of(execm.stage_run_id), f"{per_k(exec_s, sub):.3f}",
         ratio(per_k(exec_s, sub), base_k)],
        ["  of which executemany (rewards, steps, step_rewards)", "", ins(exec_ins, "insert_many"), "", "", ""],
        ["baseline: build_pairs, outcome pairs (exact_match, best vs worst)", f"{total:,}", f"{outcome_pairs_s:.3f}",
         f"{outcome_pairs.stats['pairs']:,} pairs", f"{pairs_k:.3f}", "1.00x"],
        ["build_pairs, step pairs (pairs.mode=step, step_rule)", f"{total:,}", f"{step_pairs_s:.3f}",
         f"{step_pairs.stats['pairs']:,} pairs", f"{per_k(step_pairs_s, total):.3f}",
         ratio(per_k(step_pairs_s, total), pairs_k)],
    ]
    stage_x, pairs_x = proc_s / base_s, step_pairs_s / outcome_pairs_s
    arrow_x = per_k(exec_s, sub) / per_k(arrow_s, sub)
    met = stage_x <= 3 and pairs_x <= 2
    print_table(
        f"Process rewards: {total:,} arithmetic candidates ({prompts_n:,} prompts x {n}, {made['near_misses']:,} near "
        f"misses, {made['steps']:,} steps)",
        ["what", "candidates", "seconds", "rows written", "s per 1k candidates", "vs baseline (per 1k)"], table,
        [(f"ratios are per 1,000 candidates: the reward rows against the outcome rule's stage, the pairs rows "
          f"against outcome pairs; the executemany comparison runs on a subset ({sub:,} candidates, copies of the "
          f"first {subset:,} prompts' under their own ids) because executemany costs milliseconds a row; both subset "
          "runs wrote the same steps and step rewards"),
         (f"checked: the step rule's aggregate (min) equals exact match on all {total:,} candidates; {checked:,} of "
          f"{step_pairs.stats['pairs']:,} step pairs share their steps before the fork step, differ at it, and the "
          f"chosen scores above the rejected there (scores recomputed by step_check); fork steps "
          f"{step_pairs.stats['fork_steps']}, unpaired prompts {step_pairs.stats['unpaired']}"),
         (f"reward.batch_size={args.batch_size}; each figure one timed call (registry open, ledger, dataset freeze "
          f"included); synthetic data written in {setup:.1f} s (not timed)"),
         (f"goal: process stage <= 3x the outcome rule's stage and step pairs <= 2x outcome pairs: "
          f"{'met' if met else 'not met'} ({stage_x:.2f}x, {pairs_x:.2f}x); the Arrow insert of the stage's rows makes "
          f"the process stage {arrow_x:.1f}x faster than executemany on the subset")])


if __name__ == "__main__":
    main()
