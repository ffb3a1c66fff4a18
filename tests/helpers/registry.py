"""Registry rows written by hand, so every figure a test reads back is known.

`prompt_row`, `candidate_row`, `judgment_row`, `reward_row`: a complete row of that table, every column the stages
write, with defaults for what a test does not care about (run "r", iteration 1, model "m", config hash "h", now).
`insert_rows` inserts many in one statement; `add_stage` writes a finished stage's ledger rows; `write_judged` writes
prompts, candidates and their judge samples from {prompt: {candidate: [scores]}}. `build_run` writes a whole run
(ledger, prompts, candidates, judgments, coherent rewards, pairs, models) from small functions of (prompt, candidate).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import pyarrow as pa

from flywheel.registry import Registry, now


def _common(fields: dict) -> dict:
    return {"run_id": "r", "iteration": 1, "config_hash": "h", "created_at": now(), **fields}


def prompt_row(prompt_id: str, text: str, stage_run_id: str, **fields) -> dict:
    """A kept self-instruct prompt written by model "m"; `fields` sets any other column."""
    return _common({**dict(prompt_id=prompt_id, source="self_instruct", text=text, reference=None, seed_id=None,
                           few_shot_ids=None, kept=True, drop_reason=None, model_id="m", stage_run_id=stage_run_id),
                    **fields})


def candidate_row(candidate_id: str, prompt_id: str, text: str, stage_run_id: str, **fields) -> dict:
    """Sample 0 of `prompt_id`, 2 tokens, stopped, by model "m" on the transformers backend; `fields` sets the rest."""
    return _common({**dict(candidate_id=candidate_id, prompt_id=prompt_id, sample_index=0, text=text, num_tokens=2,
                           finish_reason="stop", model_id="m", backend="transformers", sampling={}, seed=0,
                           stage_run_id=stage_run_id), **fields})


def judgment_row(candidate_id: str, sample_index: int, score: float | None, stage_run_id: str, **fields) -> dict:
    """Judge sample `sample_index` of a candidate: "Score: <score>", or a no_score parse failure when score is None;
    id "<candidate>-<sample>"."""
    return _common({**dict(judgment_id=f"{candidate_id}-{sample_index}", candidate_id=candidate_id,
                           sample_index=sample_index, raw_text=f"Score: {score}", score=score,
                           parse_error=None if score is not None else "no_score", judge_model_id="m",
                           template_hash="t", sampling={}, stage_run_id=stage_run_id), **fields})


def reward_row(candidate_id: str, value: float | None, stage_run_id: str, signal: str = "coherent", **fields) -> dict:
    """A reward signal's value for a candidate (None: an error "failed"); id "<signal>-<candidate>"."""
    return _common({**dict(reward_id=f"{signal}-{candidate_id}", candidate_id=candidate_id, signal=signal, value=value,
                           error=None if value is not None else "failed", details={}, policy_model_id="sft",
                           ref_model_id="pt", stage_run_id=stage_run_id), **fields})


def insert_rows(reg: Registry, table: str, rows: list[dict]) -> None:
    """Registry.insert, in one statement through Arrow (executemany takes ~10 ms a row on this machine)."""
    if rows:
        rows = [{k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows]
        reg.con.register("new_rows", pa.Table.from_pylist(rows))
        reg.con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM new_rows")
        reg.con.unregister("new_rows")


def add_stage(reg: Registry, run_id: str, t: int, stage: str, stats: dict | None = None) -> str:
    """A finished stage in the ledger, linked to the run's iteration t; returns its id "<stage>-<run>-<t>"."""
    sid = f"{stage}-{run_id}-{t}"
    reg.con.execute("INSERT INTO stage_runs VALUES (?, ?, ?, ?, NULL, 'h', 'done', ?, NULL, ?, ?)",
                    [sid, run_id, t, stage, json.dumps(stats or {}), now(), now()])
    reg.con.execute("INSERT INTO run_stages VALUES (?, ?, ?, ?)", [run_id, t, stage, sid])
    return sid


def write_judged(reg: Registry, scores: dict[str, dict[str, list[float | None]]], judge_sid: str,
                 lengths: dict[str, int] | None = None) -> None:
    """scores: prompt -> candidate -> judge sample scores (None = a parse failure); lengths: candidate -> tokens
    (default 2). Prompt p reads "question p", candidate c "answer c"; prompts in stage "si", candidates in "gen"."""
    prompts, cands, judgments = [], [], []
    for p, by_candidate in scores.items():
        prompts.append(prompt_row(p, f"question {p}", "si"))
        for c, samples in by_candidate.items():
            cands.append(candidate_row(c, p, f"answer {c}", "gen", num_tokens=(lengths or {}).get(c, 2)))
            judgments += [judgment_row(c, k, s, judge_sid) for k, s in enumerate(samples)]
    for table, rows in (("prompts", prompts), ("candidates", cands), ("judgments", judgments)):
        insert_rows(reg, table, rows)


# --- a whole run, row by row (the report's and the monitors' figures) ----------------------------------------------
VOCAB = [f"w{i}" for i in range(400)]


def varied_text(p: int, j: int, t: int, length: int = 20) -> str:
    """Different words for every candidate: a high distinct-2."""
    rng = random.Random(f"{p}-{j}-{t}")
    return " ".join(rng.choice(VOCAB) for _ in range(length))


def steady_tokens(p, j):  # length unrelated to score: candidate 0 and 3 long, 1 and 2 short
    return 20 + (5 if j in (0, 3) else 0)


def steady_scores(p, j):  # chosen and rejected are j 0 and 1, swapped by prompt parity: half the pairs pick the longer
    base = [1, 5, 3, 3] if p % 2 else [5, 1, 3, 3]
    return [base[j], base[j]]


HEALTHY = dict(tokens=steady_tokens, scores=steady_scores)


def build_run(root: Path, iterations: list[dict], run_id: str = "run-a", monitors: dict | None = None) -> str:
    """One run with iteration 0 (seeds, PT, M1) and one iteration per dict of `iterations`, whose keys are:
    tokens(p, j) -> int, scores(p, j) -> list of judge samples (None = a parse failure), text(p, j, t) -> str,
    coherent(p, j) -> float or None (no reward stage), loss (train_loss), prompts, n, dropped {reason: count}."""
    with Registry(root) as reg:
        config = {"run": {"name": "a"}, **({"monitors": monitors} if monitors else {})}
        reg.start_run(run_id, "a", "h", config)
        add_stage(reg, run_id, 0, "seeds", {"seeds": 5})
        add_stage(reg, run_id, 0, "sft", {"ift": 5, "eft": 3, "train_loss": 1.5})
        reg.register_model(model_id=f"m1-{run_id}", run_id=run_id, name="M1", kind="sft", iteration=0, parent_id=None,
                           path="/m1", stage_run_id=f"sft-{run_id}-0", config_hash="h", metrics={})
        model = f"m1-{run_id}"
        for t, spec in enumerate(iterations, start=1):
            model = _iteration(reg, run_id, t, model, **spec)
        reg.finish_run(run_id)
    return run_id


def _iteration(reg: Registry, run_id: str, t: int, model_in: str, *, tokens: Callable, scores: Callable,
               text: Callable = varied_text, coherent: Callable | None = None, loss: float = 0.6, prompts: int = 20,
               n: int = 4, dropped: dict | None = None) -> str:
    reg.start_iteration(run_id, t, model_in)
    at = dict(run_id=run_id, iteration=t, created_at=now())
    si, gen, jd = (add_stage(reg, run_id, t, s) for s in ("self_instruct", "generate", "judge"))
    rows = [prompt_row(f"{run_id}-p{t}-{p}", f"task {p}", si, model_id=model_in, **at) for p in range(prompts)]
    k = 0
    for reason, count in (dropped or {}).items():
        for _ in range(count):
            rows.append(dict(rows[0], prompt_id=f"{run_id}-p{t}-drop{k}", kept=False, drop_reason=reason))
            k += 1
    insert_rows(reg, "prompts", rows)
    cands, judgments, rewards, means = [], [], [], {}
    for p in range(prompts):
        for j in range(n):
            cid = f"{run_id}-c{t}-{p}-{j}"
            cands.append(candidate_row(cid, f"{run_id}-p{t}-{p}", text(p, j, t), gen, sample_index=j,
                                       num_tokens=tokens(p, j), model_id=model_in, **at))
            samples = scores(p, j)
            judgments += [judgment_row(cid, s, v, jd, judgment_id=f"j-{cid}-{s}", judge_model_id=model_in, **at)
                          for s, v in enumerate(samples)]
            valid = [v for v in samples if v is not None]
            if valid:
                means[cid] = (f"{run_id}-p{t}-{p}", sum(valid) / len(valid), tokens(p, j))
            if coherent is not None:
                rewards.append(reward_row(cid, coherent(p, j), f"reward-{run_id}-{t}", reward_id=f"r-{cid}",
                                          error=None, policy_model_id=model_in, **at))
    insert_rows(reg, "candidates", cands)
    insert_rows(reg, "judgments", judgments)
    if coherent is not None:
        add_stage(reg, run_id, t, "reward")
        insert_rows(reg, "rewards", rewards)
    pr = add_stage(reg, run_id, t, "pairs")
    pairs = []
    for p in range(prompts):
        mine = sorted((m, c) for c, (pid, m, _) in means.items() if pid == f"{run_id}-p{t}-{p}")
        if len(mine) >= 2 and mine[-1][0] > mine[0][0]:
            (lo, rej), (hi, cho) = mine[0], mine[-1]
            pairs.append(dict(pair_id=f"{run_id}-pr-{t}-{p}", prompt_id=f"{run_id}-p{t}-{p}", chosen_id=cho,
                              rejected_id=rej, chosen_score=hi, rejected_score=lo, signals={}, stage_run_id=pr,
                              config_hash="h", **at))
    insert_rows(reg, "pairs", pairs)
    out = add_stage(reg, run_id, t, "dpo")
    reg.register_model(model_id=out, run_id=run_id, name=f"M{t + 1}", kind="dpo", iteration=t, parent_id=model_in,
                       path=f"/{out}", stage_run_id=out, config_hash="h", metrics={"train_loss": loss, "steps": 3})
    reg.finish_iteration(run_id, t, out)
    return out


def register_arithmetic(root, models: dict, scores: dict[str, dict[str, list]], judge_sid: str,
                        prompts_sid: str = "si-t") -> None:
    """Trainer tests' registry: the `models` ({id: folder}) registered as SFT models; per prompt of `scores` ("What
    is i plus i?", reference 2i), its candidates (by M1) and their judge samples under `judge_sid`."""
    common = dict(run_id="r", config_hash="h", created_at=now())
    with Registry(root) as reg:
        for name, path in models.items():
            reg.register_model(model_id=name, name=name.upper(), kind="sft", iteration=0, parent_id=None,
                               path=str(path), stage_run_id=f"sft-{name}", metrics={}, **common)
        for i, (p, cands) in enumerate(scores.items()):
            reg.insert("prompts", [prompt_row(p, f"What is {i} plus {i}?", prompts_sid, reference=str(2 * i),
                                              model_id="m1")])
            for c, samples in cands.items():
                reg.insert("candidates", [candidate_row(c, p, f"The answer to {i} plus {i} is {c}.", "gen",
                                                        num_tokens=8, model_id="m1")])
                reg.insert("judgments", [judgment_row(c, k, s, judge_sid, judge_model_id="m1")
                                         for k, s in enumerate(samples)])
