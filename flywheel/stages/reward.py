"""Reward: score every candidate of a generate stage with the reward signals besides the judge.

    result = reward(cfg, run_id, iteration, candidates_sid, sft_model_id, pt_model_id)

One `rewards` row per candidate per signal: `coherent` (when reward.coherent: log p_SFT - log p_PT, with logp_sft,
logp_pt and tokens in `details`, the SFT model as policy_model_id and the PT model as ref_model_id) and one per rule
in reward.rules (with what was extracted in `details`). A value that cannot be computed is stored as NULL with the
reason in `error`, and counted. Reward ids hash (stage run, candidate, signal); candidates are scored in fixed
batches, each committed as it finishes, so a killed stage resumes at the first missing batch. The two models are
loaded once, and only when a batch is still to do: a finished stage loads nothing. Signal weights and batch size
are not part of the stage's key: they change how rewards are combined or computed, not their values.
"""

from __future__ import annotations

from ..backends import release_backends
from ..backends.models import load, resolve_device
from ..config import FlywheelConfig, content_hash
from ..registry import Registry, now
from ..registry.integrity import model_path
from ..signals import RewardError, check_same_tokenizer, coherent_rewards, make_rule
from ..stage import StageResult, pending_batches, run_stage


def reward(cfg: FlywheelConfig, run_id: str, iteration: int, candidates_sid: str, sft_model_id: str,
           pt_model_id: str) -> StageResult:
    c = cfg.reward
    device = resolve_device(cfg.run.device)
    inputs = {"candidates": candidates_sid, "sft": sft_model_id, "pt": pt_model_id, "coherent": c.coherent,
              "normalize_by_length": c.normalize_by_length, "rules": [r.model_dump(mode="json") for r in c.rules]}

    def work(reg: Registry, sid: str) -> dict:
        rules = [make_rule(r) for r in c.rules]  # a bad rule fails here, before anything is loaded or written
        signals = (["coherent"] if c.coherent else []) + [r.name for r in rules]
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

        for _, batch, _ in pending_batches(reg, "reward", "rewards", "reward_id", candidates if signals else [],
                                           c.batch_size, ids_of, f"reward (iteration {iteration})"):
            rows = []
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
            reg.insert("rewards", [{**r, **common, "created_at": now()} for r in rows])

        stats = reg.rows("SELECT signal, count(*) AS n, avg(value) AS mean, count(*) FILTER (WHERE value IS NULL) "
                         "AS failures FROM rewards WHERE stage_run_id = ? GROUP BY signal ORDER BY signal", [sid])
        return {"candidates": len(candidates),
                "signals": {r["signal"]: {"count": r["n"], "mean": None if r["mean"] is None else round(r["mean"], 4),
                                          "failures": r["failures"]} for r in stats}}

    return run_stage(cfg, "reward", run_id, iteration, sft_model_id, inputs, work)
