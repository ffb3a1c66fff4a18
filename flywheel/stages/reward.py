"""Reward: score every candidate of a generate stage with the reward signals besides the judge.

    result = reward(cfg, run_id, iteration, candidates_sid, sft_model_id, pt_model_id)

One `rewards` row per candidate per signal: `coherent` (when reward.coherent: log p_SFT - log p_PT, with logp_sft,
logp_pt and tokens in `details`, the SFT model as policy_model_id and the PT model as ref_model_id) and one per rule
in reward.rules (with what was extracted in `details`). A value that cannot be computed is stored as NULL with the
reason in `error`, and counted. Reward ids hash (stage run, candidate, signal); candidates are scored in fixed
batches, each committed as it finishes, so a killed stage resumes at the first missing batch. The two models are
loaded once, and only when a batch is still to do: a finished stage loads nothing. Signal weights and batch size
are not part of the stage's key: they change how rewards are combined or computed, not their values.

Process rewards (`steps.split` set, flywheel/stages/steps.py): each candidate is also split into steps, stored as
`steps` rows (candidate, index, text, span, the hash of the steps before it), and each step is scored by the step rule
(`steps.rule`) and/or M_t as step judge (`steps.judge`), one `step_rewards` row per step and signal. Their aggregate
(`steps.aggregate`: min, product or mean) is the candidate's `step_rule` / `step_judge` row in `rewards`, so pairs,
RS-SFT's best of N and the report use it like any other signal; a candidate whose steps cannot all be scored gets
NULL there with the reason. A batch's steps and step rewards are written before its `rewards` rows, which mark it
done: a crash in between redoes the batch and finds the same ids. Without `steps.split` the stage's key and rows are
what they were before process rewards existed.
"""

from __future__ import annotations

from ..backends import release_backends
from ..backends.models import load, resolve_device
from ..config import FlywheelConfig, content_hash
from ..registry import Registry, now
from ..registry.integrity import model_path
from ..signals import RewardError, check_same_tokenizer, coherent_rewards, make_rule
from ..stage import StageResult, backend_for, batch_seed, load_template, pending_batches, run_stage
from . import steps as st


def reward(cfg: FlywheelConfig, run_id: str, iteration: int, candidates_sid: str, sft_model_id: str,
           pt_model_id: str, model_id: str | None = None) -> StageResult:
    """`model_id`: M_t, the step judge (read only when steps.judge is on)."""
    c = cfg.reward
    device = resolve_device(cfg.run.device)
    inputs = {"candidates": candidates_sid, "sft": sft_model_id, "pt": pt_model_id, "coherent": c.coherent,
              "normalize_by_length": c.normalize_by_length, "rules": [r.model_dump(mode="json") for r in c.rules]}
    step_template = None
    if cfg.steps.enabled:
        judge_only = {"judge_template", "judge_samples", "judge_temperature", "judge_max_new_tokens"}
        inputs["steps"] = cfg.steps.model_dump(  # how fast, and the trainers' credit, change no step reward
            mode="json", exclude={"credit", "judge_batch_size", *(() if cfg.steps.judge else judge_only)})
        if cfg.steps.judge:
            if model_id is None:
                raise ValueError("reward: steps.judge needs M_t, the step judge")
            step_template = st.check_step_judge(cfg)
            with Registry(cfg.registry.root) as reg:
                _, inputs["step_judge_template"] = load_template(reg, cfg.steps.judge_template, "step_judge")
            inputs["step_judge_model"] = model_id
        if cfg.steps.rule:
            st.load_step_rule(cfg.steps.rule)  # an unimportable rule fails here, before any work

    def work(reg: Registry, sid: str) -> dict:
        rules = [make_rule(r) for r in c.rules]  # a bad rule fails here, before anything is loaded or written
        step_signals = cfg.steps.signals()
        signals = (["coherent"] if c.coherent else []) + [r.name for r in rules] + step_signals
        candidates = reg.rows(
            "SELECT c.candidate_id, c.text AS response, p.text AS prompt, p.reference FROM candidates c "
            "JOIN prompts p USING (prompt_id) WHERE c.stage_run_id = ? ORDER BY c.candidate_id", [candidates_sid])
        common = dict(run_id=run_id, iteration=iteration, stage_run_id=sid, config_hash=cfg.config_hash())
        models: dict = {}

        def loaded() -> dict:
            if not models:
                release_backends()  # the generation model is not needed any more
                paths = [model_path(reg, m) for m in (sft_model_id, pt_model_id)]  # present and unaltered
                reg.release()  # loading needs no registry: readers get in meanwhile
                (sft, tok_sft), (pt, tok_pt) = (load(path, device) for path in paths)
                check_same_tokenizer(tok_sft, tok_pt)
                models.update(sft=sft, pt=pt, tokenizer=tok_sft)
            return models

        def rid(candidate_id: str, signal: str) -> str:
            return f"r-{content_hash([sid, candidate_id, signal])}"

        def ids_of(batch: list) -> list[str]:
            return [rid(x["candidate_id"], s) for x in batch for s in signals]

        judge: dict = {}

        def step_judge():
            if not judge:
                judge["engine"] = backend_for(cfg, reg, model_id)
            return judge["engine"]

        for b, batch, _ in pending_batches(reg, "reward", "rewards", "reward_id", candidates if signals else [],
                                           c.batch_size, ids_of, f"reward (iteration {iteration})"):
            rows = []
            if step_signals:
                step_rows, reward_rows = score_steps(cfg, batch, step_template, step_judge, sid,
                                                     batch_seed(sid, b, cfg.run.seed), model_id)
                reg.insert_many("steps", [{**r, "run_id": run_id, "iteration": iteration, "stage_run_id": sid,
                                      "created_at": now()} for r in step_rows["steps"]])
                reg.insert_many("step_rewards", [{**r, **common, "created_at": now()} for r in step_rows["scores"]])
                rows += [{**r, "reward_id": rid(r["candidate_id"], r["signal"])} for r in reward_rows]
            if c.coherent:
                m = loaded()
                scores = coherent_rewards(m["sft"], m["pt"], m["tokenizer"], [x["prompt"] for x in batch],
                                          [x["response"] for x in batch], batch_size=c.batch_size,
                                          normalize=c.normalize_by_length, device=device)
                for x, s in zip(batch, scores):
                    rows.append(dict(reward_id=rid(x["candidate_id"], "coherent"), candidate_id=x["candidate_id"],
                                     signal="coherent", value=s["value"], error=s.get("error"),
                                     details={k: s[k] for k in ("logp_sft", "logp_pt", "tokens") if k in s},
                                     policy_model_id=sft_model_id, ref_model_id=pt_model_id))
            for rule in rules:
                for x in batch:
                    try:
                        value, details, error = *rule(x["prompt"], x["response"], x["reference"]), None
                    except RewardError as e:
                        value, details, error = None, {}, str(e)
                    rows.append(dict(reward_id=rid(x["candidate_id"], rule.name), candidate_id=x["candidate_id"],
                                     signal=rule.name, value=value, error=error, details=details,
                                     policy_model_id=None, ref_model_id=None))
            reg.insert_many("rewards", [{**r, **common, "created_at": now()} for r in rows])

        stats = reg.rows("SELECT signal, count(*) AS n, avg(value) AS mean, count(*) FILTER (WHERE value IS NULL) "
                         "AS failures FROM rewards WHERE stage_run_id = ? GROUP BY signal ORDER BY signal", [sid])
        out = {"candidates": len(candidates),
               "signals": {r["signal"]: {"count": r["n"], "mean": None if r["mean"] is None else round(r["mean"], 4),
                                         "failures": r["failures"]} for r in stats}}
        if step_signals:
            out["steps"] = step_stats(reg, sid)
        return out

    return run_stage(cfg, "reward", run_id, iteration, sft_model_id, inputs, work)


def score_steps(cfg: FlywheelConfig, batch: list[dict], template: str | None, judge_engine, sid: str, seed: int,
                judge_model_id: str | None) -> tuple[dict, list[dict]]:
    """A batch's process rewards: ({"steps": step rows, "scores": step_rewards rows}, one aggregated `rewards` row per
    candidate and step signal, without its reward_id). `judge_engine()` gives M_t's backend (called only when
    steps.judge is on and some step is to judge)."""
    c = cfg.steps
    steps_of = {x["candidate_id"]: st.split_steps(x["response"], c) for x in batch}
    step_rows, scores, outcome = [], [], []

    def step_id(candidate_id: str, k: int) -> str:
        return f"st-{content_hash([sid, candidate_id, k])}"

    for x in batch:
        steps = steps_of[x["candidate_id"]]
        for s, prefix in zip(steps, st.prefix_hashes([s.text for s in steps])):
            step_rows.append(dict(step_id=step_id(x["candidate_id"], s.index), candidate_id=x["candidate_id"],
                                  step_index=s.index, text=s.text, start_char=s.start, end_char=s.end,
                                  prefix_hash=prefix))

    def record(signal: str, x: dict, values: list, details: list, error: str | None, judge_id: str | None):
        cid = x["candidate_id"]
        for k, (v, d) in enumerate(zip(values, details)):
            scores.append(dict(step_reward_id=f"sr-{content_hash([sid, cid, k, signal])}", step_id=step_id(cid, k),
                               candidate_id=cid, step_index=k, signal=signal, value=v,
                               error=error if v is None else None, details=d, judge_model_id=judge_id))
        value = st.aggregate(values, c.aggregate)
        why = error or ("no steps" if not values else "a step has no score" if value is None else None)
        outcome.append(dict(candidate_id=cid, signal=signal, value=value, error=why,
                            details={"aggregate": c.aggregate, "steps": len(values),
                                     "step_values": values}, policy_model_id=judge_id, ref_model_id=None))

    if c.rule:
        rule = st.load_step_rule(c.rule)
        for x in batch:
            texts = [s.text for s in steps_of[x["candidate_id"]]]
            try:
                values, error = st.rule_step_scores(rule, c.rule, x["prompt"], x["reference"], texts), None
            except st.StepRewardError as e:
                values, error = [None] * len(texts), str(e)
            record("step_rule", x, values, [None] * len(texts), error, None)
    if c.judge:
        items = [(x["prompt"], [s.text for s in steps_of[x["candidate_id"]]], k)
                 for x in batch for k in range(len(steps_of[x["candidate_id"]]))]
        found = iter(st.step_verdicts(judge_engine(), template, items, c, seed) if items else [])
        for x in batch:
            verdicts = [next(found) for _ in steps_of[x["candidate_id"]]]
            errors = [next((e for e in v.errors if e), None) for v in verdicts]
            record("step_judge", x, [v.value for v in verdicts],
                   [{"raw": v.raw, "scores": v.scores, "errors": v.errors} for v in verdicts],
                   next((f"step {k}: {e}" for k, (v, e) in enumerate(zip(verdicts, errors)) if v.value is None),
                        None), judge_model_id)
    return {"steps": step_rows, "scores": scores}, outcome


def step_stats(reg: Registry, sid: str) -> dict:
    """The stage's steps in figures: candidates split, steps per candidate, and per step signal the steps scored, their
    mean, and the failures by reason (the step judge's parse failures counted per sample)."""
    row = reg.rows("SELECT count(DISTINCT candidate_id) AS candidates, count(*) AS steps FROM steps "
                   "WHERE stage_run_id = ?", [sid])[0]
    per = reg.rows(
        "SELECT signal, count(*) AS n, count(value) AS scored, avg(value) AS mean FROM step_rewards "
        "WHERE stage_run_id = ? GROUP BY signal ORDER BY signal", [sid])
    parse = reg.rows(
        "SELECT e AS error, count(*) AS n FROM (SELECT unnest(from_json(details->'errors', '[\"VARCHAR\"]')) AS e "
        "FROM step_rewards WHERE stage_run_id = ? AND signal = 'step_judge') WHERE e IS NOT NULL GROUP BY e "
        "ORDER BY e", [sid])
    return {"candidates": row["candidates"], "steps": row["steps"],
            "mean_steps": round(row["steps"] / row["candidates"], 3) if row["candidates"] else None,
            "signals": {r["signal"]: {"steps": r["n"], "scored": r["scored"],
                                      "mean": None if r["mean"] is None else round(r["mean"], 4)} for r in per},
            "judge_parse_failures": {r["error"]: r["n"] for r in parse}}
