"""Judge: M_t scores each candidate with the additive 5-point rubric (`prompts/judge.txt`), k samples each.

Every sample is stored with its raw text. The score is parsed from the judge's own words (`score_parser`); a sample
with no valid verdict is stored with score NULL and the reason, counted in the stage's stats, and left out of the
candidate's average. A candidate with no valid sample gets no average and so takes no part in a pair.
"""

from __future__ import annotations

from .backends import SamplingParams
from .config import FlywheelConfig, content_hash
from .registry import Registry, now
from .score_parser import parse_score
from .stage import StageResult, backend_for, batch_seed, load_template, pending_batches, run_stage


def judge(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, candidates_sid: str) -> StageResult:
    c = cfg.judge
    with Registry(cfg.registry.root) as reg:
        template, template_hash = load_template(reg, c.template, "judge")
    inputs = {"model": model_id, "candidates": candidates_sid, "cfg": c.model_dump(mode="json"),
              "template": template_hash, "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        cands = reg.rows(
            "SELECT c.candidate_id, p.text AS instruction, c.text AS response FROM candidates c "
            "JOIN prompts p USING (prompt_id) WHERE c.stage_run_id = ? ORDER BY c.candidate_id", [candidates_sid])
        params = SamplingParams(n=c.samples, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)
        common = dict(judge_model_id=model_id, template_hash=template_hash, sampling=params.as_dict(), run_id=run_id,
                      iteration=iteration, stage_run_id=sid, config_hash=cfg.config_hash())

        def ids_of(batch: list) -> list[str]:
            return [f"j-{content_hash([sid, x['candidate_id'], k])}" for x in batch for k in range(c.samples)]

        for b, batch, ids in pending_batches(reg, "judge", "judgments", "judgment_id", cands, c.batch_size, ids_of,
                                             f"judge (iteration {iteration})"):
            texts = [template.format(instruction=x["instruction"], response=x["response"]) for x in batch]
            outs = backend_for(cfg, reg, model_id).generate(texts, params, seed=batch_seed(sid, b, cfg.run.seed),
                                                            chat=True)
            samples = [(x, k, g) for x, gens in zip(batch, outs) for k, g in enumerate(gens)]
            rows = []
            for jid, (x, k, g) in zip(ids, samples):
                parsed = parse_score(g.text)
                rows.append(dict(judgment_id=jid, candidate_id=x["candidate_id"], sample_index=k, raw_text=g.text,
                                 score=parsed.score, parse_error=parsed.error, created_at=now(), **common))
            reg.insert("judgments", rows)
        row = reg.rows(
            "SELECT count(*) AS samples, count(score) AS parsed, avg(score) AS mean_score, "
            "count(DISTINCT candidate_id) FILTER (WHERE score IS NOT NULL) AS scored_candidates "
            "FROM judgments WHERE stage_run_id = ?", [sid])[0]
        errors = reg.rows("SELECT parse_error AS e, count(*) AS n FROM judgments WHERE stage_run_id = ? "
                          "AND parse_error IS NOT NULL GROUP BY ALL ORDER BY e", [sid])
        return {"samples": row["samples"], "parse_failures": row["samples"] - row["parsed"],
                "parse_errors": {r["e"]: r["n"] for r in errors}, "scored_candidates": row["scored_candidates"],
                "candidates": len(cands), "mean_score": round(row["mean_score"], 3) if row["parsed"] else None}

    return run_stage(cfg, "judge", run_id, iteration, model_id, inputs, work)
