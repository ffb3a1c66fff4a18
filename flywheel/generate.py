"""Generate: M_t samples N candidate responses for every prompt kept by self-instruct.

Candidate ids hash (stage run, prompt, sample index); prompts go to the backend in fixed batches with one seed per
batch, and each batch is committed as it finishes, so a killed stage resumes at the first missing batch and a
finished one loads no model at all. Sampling parameters, backend, model and seed are stored with every candidate.
"""

from __future__ import annotations

from .backends import SamplingParams, make_backend
from .config import FlywheelConfig, content_hash
from .models import resolve_device
from .progress import progress
from .registry import Registry, now
from .stage import StageResult, batch_seed, batches, log_batch, run_stage


def generate(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, prompts_sid: str) -> StageResult:
    c = cfg.generate
    inputs = {"model": model_id, "prompts": prompts_sid, "cfg": c.model_dump(mode="json"), "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        prompts = reg.rows("SELECT prompt_id, text FROM prompts WHERE stage_run_id = ? AND kept ORDER BY prompt_id",
                           [prompts_sid])
        params = SamplingParams(n=c.n, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)
        backend = None
        todo = list(batches(prompts, c.batch_size))
        for b, batch in progress(todo, f"generate (iteration {iteration})"):
            ids = [[f"c-{content_hash([sid, p['prompt_id'], j])}" for j in range(c.n)] for p in batch]
            if reg.existing("candidates", "candidate_id", sum(ids, [])) == set(sum(ids, [])):
                continue
            backend = backend or make_backend(c.backend, reg.model(model_id)["path"], resolve_device(cfg.run.device))
            seed = batch_seed(sid, b, cfg.run.seed)
            outs = backend.generate([p["text"] for p in batch], params, seed=seed, chat=True)
            rows = reg.insert("candidates", [
                dict(candidate_id=cid, prompt_id=p["prompt_id"], sample_index=j, text=g.text, num_tokens=g.num_tokens,
                     finish_reason=g.finish_reason, model_id=model_id, backend=c.backend, sampling=params.as_dict(),
                     seed=seed, run_id=run_id, iteration=iteration, stage_run_id=sid,
                     config_hash=content_hash(inputs), created_at=now())
                for p, cids, gens in zip(batch, ids, outs) for j, (cid, g) in enumerate(zip(cids, gens))
            ])
            log_batch("generate", b, len(todo), rows)
        row = reg.rows("SELECT count(*) AS n, count(DISTINCT prompt_id) AS prompts, avg(num_tokens) AS mean_tokens "
                       "FROM candidates WHERE stage_run_id = ?", [sid])[0]
        return {"candidates": row["n"], "prompts": row["prompts"], "mean_tokens": round(row["mean_tokens"] or 0, 1)}

    return run_stage(cfg, "generate", run_id, iteration, model_id, inputs, work)
