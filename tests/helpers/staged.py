"""`build_flywheel`: a run filled stage by stage through the real `run_stage` (which freezes each stage's outputs),
with rows written by hand so every score and pair is known. No model runs: the stages' rows are what the real stages
would write; the freezing, hashing, versioning and lineage links are the real thing (test_datasets, test_lineage)."""

from flywheel.config import content_hash, load_config
from flywheel.registry import now
from flywheel.stage import run_stage

SEEDS = [("s1", "Explain how a rainbow forms.", "Sunlight refracts in raindrops."),
         ("s2", "List three uses of vinegar.", "Cleaning, pickling, dressing."),
         ("s3", "Write a haiku about autumn leaves.", "Red leaves drift and fall.")]
PROMPTS = {1: ["Describe how bread rises.", "Give two tips for sleeping well.", "Name a prime number above 50.",
               "Summarise the water cycle.", "hi"],                          # "hi" is dropped (too short)
           2: ["Explain what a leap year is.", "Suggest a name for a cat.", "Say why the sky is blue.",
               "List the planets in order.", "ok"]}
# Judge scores per prompt (by position) and candidate, for two judge variants; None: that prompt ties (no pair).
SCORES = {0: [[5, 2, 3], [4, 1, 2], [3, 3, 3], [2, 5, 1]],
          1: [[2, 5, 3], [3, 3, 3], [1, 4, 2], [2, 5, 1]]}
SAMPLING = {"n": 3, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 32}
JUDGE_TEMPLATE = "Review the response.\nInstruction: {instruction}\nResponse: {response}\nScore: <0-5>"


def _common(run_id, t, sid, cfg):
    return dict(run_id=run_id, iteration=t, stage_run_id=sid, config_hash=cfg.config_hash(), created_at=now())


def build_flywheel(root, run_id="run-a", iterations=1, variant=0, link_dataset=True) -> dict:
    """Seeds -> PT -> M1 -> (self_instruct, generate, judge, reward, pairs, dpo) x iterations, through run_stage.
    Returns {stage or "stage:t": StageResult}. `variant` changes the judge (and so the pairs); `link_dataset`
    makes DPO record the train version it read in models.dataset_version (else only the run's stages link them)."""
    cfg = load_config(None, [f"registry.root={root}"])
    out = {}

    def seeds_work(reg, sid):
        ids = [f"p-{content_hash([sid, i])}" for i in range(len(SEEDS))]
        reg.insert("prompts", [dict(prompt_id=pid, source="seed", text=text, reference=ref, seed_id=seed_id,
                                    few_shot_ids=None, kept=True, drop_reason=None, model_id=None,
                                    **_common(run_id, 0, sid, cfg))
                               for pid, (seed_id, text, ref) in zip(ids, SEEDS)])
        reg.insert("seed_responses", [dict(response_id="r-1", prompt_id=ids[0], text="A worse answer.",
                                           human_rank=1, stage_run_id=sid, created_at=now())])
        return {"seeds": len(SEEDS)}

    out["seeds"] = seeds = run_stage(cfg, "seeds", run_id, 0, None, {"seeds": SEEDS}, seeds_work)

    def model_work(name, kind, t, parent, ref=None, dataset=None):
        def work(reg, sid):
            reg.register_model(model_id=sid, run_id=run_id, name=name, kind=kind, iteration=t, parent_id=parent,
                               path=str(reg.model_dir(sid)), stage_run_id=sid, config_hash=cfg.config_hash(),
                               metrics={"loss": 0.5}, ref_model_id=ref, dataset_version=dataset)
            return {"model_id": sid}
        return work

    out["base"] = base = run_stage(cfg, "base", run_id, 0, None, {"seeds": seeds.stage_run_id},
                                   model_work("PT", "base", 0, None))
    out["sft"] = sft = run_stage(cfg, "sft", run_id, 0, base.stage_run_id,
                                 {"base": base.stage_run_id, "seeds": seeds.stage_run_id},
                                 model_work("M1", "sft", 0, base.stage_run_id))
    model, earlier = sft.stage_run_id, []
    for t in range(1, iterations + 1):
        def si_work(reg, sid):
            shots = reg.rows("SELECT prompt_id FROM prompts WHERE stage_run_id = ? ORDER BY prompt_id LIMIT 2",
                             [seeds.stage_run_id])
            reg.insert("prompts", [dict(
                prompt_id=f"p-{content_hash([sid, i])}", source="self_instruct", text=text, reference=None,
                seed_id=None, few_shot_ids=[s["prompt_id"] for s in shots], kept=len(text) > 3,
                drop_reason=None if len(text) > 3 else "too_short", model_id=model, **_common(run_id, t, sid, cfg))
                for i, text in enumerate(PROMPTS[t])])
            return {}

        si = run_stage(cfg, "self_instruct", run_id, t, model, {"model": model, "seeds": seeds.stage_run_id,
                                                                "earlier": earlier}, si_work)

        def gen_work(reg, sid):
            prompts = reg.rows("SELECT prompt_id, text FROM prompts WHERE stage_run_id = ? AND kept "
                               "ORDER BY prompt_id", [si.stage_run_id])
            reg.insert("candidates", [dict(
                candidate_id=f"c-{content_hash([sid, p['prompt_id'], k])}", prompt_id=p["prompt_id"], sample_index=k,
                text=f"answer {k} to {p['text']}", num_tokens=5 + k, finish_reason="stop", model_id=model,
                backend="transformers", sampling=SAMPLING, seed=1000 + i, **_common(run_id, t, sid, cfg))
                for i, p in enumerate(prompts) for k in range(3)])
            return {}

        gen = run_stage(cfg, "generate", run_id, t, model, {"model": model, "prompts": si.stage_run_id}, gen_work)

        def judge_work(reg, sid):
            template_hash = content_hash(JUDGE_TEMPLATE)
            reg.register_template(template_hash, "judge", JUDGE_TEMPLATE)
            cands = reg.rows("SELECT c.candidate_id, c.sample_index, p.text FROM candidates c JOIN prompts p "
                             "USING (prompt_id) WHERE c.stage_run_id = ?", [gen.stage_run_id])
            rows = []
            for c in cands:
                score = SCORES[variant][PROMPTS[t].index(c["text"])][c["sample_index"]]
                for k in range(2):
                    bad = k == 1 and c["sample_index"] == 1  # the second sample of candidate 1 has no verdict
                    rows.append(dict(
                        judgment_id=f"j-{content_hash([sid, c['candidate_id'], k])}", candidate_id=c["candidate_id"],
                        sample_index=k, raw_text="I cannot decide." if bad else f"Fine work. Score: {score}",
                        score=None if bad else float(score), parse_error="no_score" if bad else None,
                        judge_model_id=model, template_hash=template_hash, sampling={**SAMPLING, "n": 2},
                        **_common(run_id, t, sid, cfg)))
            reg.insert("judgments", rows)
            return {}

        judged = run_stage(cfg, "judge", run_id, t, model, {"model": model, "candidates": gen.stage_run_id,
                                                            "variant": variant}, judge_work)

        def reward_work(reg, sid):
            cands = reg.rows("SELECT candidate_id, num_tokens FROM candidates WHERE stage_run_id = ?",
                             [gen.stage_run_id])
            reg.insert("rewards", [dict(
                reward_id=f"rw-{content_hash([sid, c['candidate_id']])}", candidate_id=c["candidate_id"],
                signal="coherent", value=0.1 * c["num_tokens"], error=None,
                details={"logp_sft": -3.0, "logp_pt": -3.0 - 0.1 * c["num_tokens"], "tokens": c["num_tokens"]},
                policy_model_id=sft.stage_run_id, ref_model_id=base.stage_run_id, **_common(run_id, t, sid, cfg))
                for c in cands])
            return {}

        reward = run_stage(cfg, "reward", run_id, t, None, {"candidates": gen.stage_run_id,
                                                            "policy": sft.stage_run_id}, reward_work)

        def pairs_work(reg, sid):
            scored = reg.rows(
                "SELECT c.prompt_id, c.candidate_id, avg(j.score) AS judge, any_value(r.value) AS coherent "
                "FROM candidates c JOIN judgments j USING (candidate_id) JOIN rewards r USING (candidate_id) "
                "WHERE j.stage_run_id = ? AND r.stage_run_id = ? AND j.score IS NOT NULL GROUP BY ALL "
                "ORDER BY c.prompt_id, c.candidate_id", [judged.stage_run_id, reward.stage_run_id])
            by_prompt: dict = {}
            for r in scored:
                by_prompt.setdefault(r["prompt_id"], []).append(r)
            rows = []
            for pid, cs in by_prompt.items():
                best, worst = max(cs, key=lambda r: r["judge"]), min(cs, key=lambda r: r["judge"])
                if best["judge"] == worst["judge"]:
                    continue
                rows.append(dict(
                    pair_id=f"pr-{content_hash([sid, pid])}", prompt_id=pid, chosen_id=best["candidate_id"],
                    rejected_id=worst["candidate_id"], chosen_score=best["judge"], rejected_score=worst["judge"],
                    signals={"weights": {"judge": 1.0}, "rho": 0.0,
                             "chosen": {"judge": best["judge"], "coherent": best["coherent"]},
                             "rejected": {"judge": worst["judge"], "coherent": worst["coherent"]}},
                    **_common(run_id, t, sid, cfg)))
            reg.insert("pairs", rows)
            return {"pairs": len(rows)}

        pairs = run_stage(cfg, "pairs", run_id, t, None, {"judgments": judged.stage_run_id,
                                                          "rewards": reward.stage_run_id}, pairs_work)
        train = pairs.stats["dataset_versions"]["train"] if link_dataset else None
        dpo = run_stage(cfg, "dpo", run_id, t, model, {"model": model, "pairs": pairs.stage_run_id},
                        model_work(f"M{t + 1}", "dpo", t, model, ref=model, dataset=train))
        out.update({f"{k}:{t}": v for k, v in dict(self_instruct=si, generate=gen, judge=judged, reward=reward,
                                                    pairs=pairs, dpo=dpo).items()})
        model = dpo.stage_run_id
        earlier.append(si.stage_run_id)
    return out


def versions(result):
    """The dataset versions a stage froze: {name: version id}."""
    return result.stats.get("dataset_versions", {})
