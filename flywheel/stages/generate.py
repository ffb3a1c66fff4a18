"""Generate: M_t samples N candidate responses for every prompt kept by self-instruct.

Candidate ids hash (stage run, prompt, sample index); prompts go to the backend in fixed batches with one seed per
batch, and each batch is committed as it finishes, so a killed stage resumes at the first missing batch and a
finished one loads no model at all. Sampling parameters, backend, model and seed are stored with every candidate.
"""

from __future__ import annotations

from ..backends import SamplingParams
from ..config import FlywheelConfig, content_hash
from ..registry import Registry, now
from ..registry.reads import kept_prompts
from ..stage import StageResult, backend_for, batch_seed, pending_batches, run_stage


def generate(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, prompts_sid: str) -> StageResult:
    c = cfg.generate
    inputs = {"model": model_id, "prompts": prompts_sid, "cfg": c.model_dump(mode="json"), "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        prompts = kept_prompts(reg, prompts_sid)
        params = SamplingParams(n=c.n, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)
        common = dict(model_id=model_id, backend=c.backend, sampling=params.as_dict(), run_id=run_id,
                      iteration=iteration, stage_run_id=sid, config_hash=cfg.config_hash())

        def ids_of(batch: list) -> list[str]:
            return [f"c-{content_hash([sid, p['prompt_id'], j])}" for p in batch for j in range(c.n)]

        for b, batch, ids in pending_batches(reg, "generate", "candidates", "candidate_id", prompts, c.batch_size,
                                             ids_of, f"generate (iteration {iteration})"):
            seed = batch_seed(sid, b, cfg.run.seed)
            outs = backend_for(cfg, reg, model_id).generate([p["prompt"] for p in batch], params, seed=seed, chat=True)
            samples = [(p, j, g) for p, gens in zip(batch, outs) for j, g in enumerate(gens)]
            reg.insert("candidates", [
                dict(candidate_id=cid, prompt_id=p["prompt_id"], sample_index=j, text=g.text, num_tokens=g.num_tokens,
                     finish_reason=g.finish_reason, seed=seed, created_at=now(), **common)
                for cid, (p, j, g) in zip(ids, samples)
            ])
        row = reg.rows("SELECT count(*) AS n, count(DISTINCT prompt_id) AS prompts, avg(num_tokens) AS mean_tokens "
                       "FROM candidates WHERE stage_run_id = ?", [sid])[0]
        return {"candidates": row["n"], "prompts": row["prompts"], "mean_tokens": round(row["mean_tokens"] or 0, 1)}

    return run_stage(cfg, "generate", run_id, iteration, model_id, inputs, work)
