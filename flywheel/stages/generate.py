"""Generate: M_t samples N candidate responses for every prompt kept by self-instruct.

Candidate ids hash (stage run, prompt, sample index); prompts go to the backend in fixed batches with one seed per
batch, and each batch is committed as it finishes, so a killed stage resumes at its missing batches and a finished
one loads no model at all. Sampling parameters, backend, model and seed are stored with every candidate.

`generate.backend: ray` runs the batches on a Ray actor pool (`run_batches`; committed in the order they finish)
with the engine `ray.engine`: the stage id hashes that engine's name instead of "ray", so the stage, its seeds and its
candidates are those of the in-process backend (rows say backend "ray").

With temporal anchoring (`pairs.anchor: m1`, from iteration 2: `anchor_id` is M1) the same stage run also holds
`generate.anchor_n` candidates per prompt sampled from the anchor model, the pairs' rejected side: their rows carry
the anchor's model id, their sample indices continue after M_t's n and their batches (and seeds) after M_t's, resumed
alike. Without an anchor the stage's inputs, and so its id, are what they were before anchoring existed.
"""

from __future__ import annotations

from ..backends import SamplingParams
from ..config import FlywheelConfig, content_hash
from ..registry import Registry, now
from ..registry.reads import kept_prompts
from ..stage import StageResult, backend_for, batch_seed, run_batches, run_stage


def generate(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, prompts_sid: str,
             anchor_id: str | None = None) -> StageResult:
    """`anchor_id`: the model whose candidates are also sampled (`generate.anchor_n` per prompt), or None."""
    c = cfg.generate
    anchor_n = c.n if c.anchor_n is None else c.anchor_n
    section = c.model_dump(mode="json", exclude={"anchor_n"})
    if c.backend == "ray":  # where the engine runs is not what it makes: the same id (and seeds) as in-process
        section["backend"] = cfg.ray.engine
    inputs = {"model": model_id, "prompts": prompts_sid, "cfg": section, "seed": cfg.run.seed}
    if anchor_id is not None:
        inputs["anchor"] = {"model": anchor_id, "n": anchor_n}

    def work(reg: Registry, sid: str) -> dict:
        prompts = kept_prompts(reg, prompts_sid)
        # (model, label, first sample index, candidates per prompt, first batch index): M_t's, then the anchor's
        runs = [(model_id, f"generate (iteration {iteration})", 0, c.n, 0)]
        if anchor_id is not None:
            runs.append((anchor_id, f"generate from the anchor {anchor_id} (iteration {iteration})", c.n, anchor_n,
                         -(-len(prompts) // c.batch_size)))
        for model, label, first, n, first_batch in runs:
            params = SamplingParams(n=n, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)
            common = dict(model_id=model, backend=c.backend, sampling=params.as_dict(), run_id=run_id,
                          iteration=iteration, stage_run_id=sid, config_hash=cfg.config_hash())

            def ids_of(batch: list, first=first, n=n) -> list[str]:
                return [f"c-{content_hash([sid, p['prompt_id'], j])}" for p in batch for j in range(first, first + n)]

            def sample(engine, b: int, batch: list, params=params, first_batch=first_batch, run_seed=cfg.run.seed):
                """A batch's candidates; runs where the engine is (a Ray worker too): no registry in here."""
                return engine.generate([p["prompt"] for p in batch], params, chat=True,
                                       seed=batch_seed(sid, first_batch + b, run_seed))

            for b, batch, ids, outs in run_batches(reg, "generate", "candidates", "candidate_id", prompts,
                                                   c.batch_size, ids_of, label,
                                                   lambda model=model: backend_for(cfg, reg, model), sample):
                seed = batch_seed(sid, first_batch + b, cfg.run.seed)
                samples = [(p, first + j, g) for p, gens in zip(batch, outs) for j, g in enumerate(gens)]
                reg.insert("candidates", [
                    dict(candidate_id=cid, prompt_id=p["prompt_id"], sample_index=j, text=g.text,
                         num_tokens=g.num_tokens, finish_reason=g.finish_reason, seed=seed, created_at=now(), **common)
                    for cid, (p, j, g) in zip(ids, samples)
                ])
        row = reg.rows("SELECT count(*) AS n, count(DISTINCT prompt_id) AS prompts, avg(num_tokens) AS mean_tokens, "
                       "count(*) FILTER (WHERE model_id = $anchor) AS anchored "
                       "FROM candidates WHERE stage_run_id = $sid", {"sid": sid, "anchor": anchor_id})[0]
        stats = {"candidates": row["n"], "prompts": row["prompts"], "mean_tokens": round(row["mean_tokens"] or 0, 1)}
        if anchor_id is not None:
            stats.update(anchor=anchor_id, anchor_candidates=row["anchored"])
        return stats

    return run_stage(cfg, "generate", run_id, iteration, model_id, inputs, work)
