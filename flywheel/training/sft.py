"""Supervised fine-tuning, three ways, one fit: M1, the plain-SFT baseline, and rejection-sampling SFT.

    M1_SFT.stage(ctx, state)    # iteration 0: the base model (state.pt) on the seeds' IFT + EFT examples -> M1
                                # (sft.mode skip: M1 is the base itself, R1-Zero; cold_start: a few seed chains)
    BASELINE.stage(ctx, state)  # trainer 'sft': M_t further on M1's own SFT data, no generation or judging
    RS_SFT.stage(ctx, state)    # trainer 'rs-sft': M_t on the best candidate per prompt by the combined score

Each builds a TrainJob whose `settings` say how it trains (epochs, learning rate, batch, LoRA); `fit_sft` runs TRL's
SFTTrainer with them (`flywheel.training.loops.sft_train`) and saves the model, merged if LoRA trained.
"""

from __future__ import annotations

import random
from collections import Counter

from ..backends.models import resolve_device
from ..config import FlywheelConfig, LoraConfig, content_hash
from ..registry import Registry
from ..registry.integrity import model_path
from ..registry.reads import ranked_from_registry, seeds_from_registry
from ..stage import IterationState, StageContext, StageResult, load_template
from ..stages.score_parser import parse_score
from ..stages.seeds import eft_examples, eft_from_rankings, ift_examples
from .common import loops, train_stage
from .job import NoTrainingDataError, Trainer, TrainJob


def sft_examples(reg: Registry, seeds_sid: str, judge_template: str, *, eft: bool, seed: int,
                 verdict_only: bool = False) -> tuple[list, dict]:
    """M1's SFT rows: IFT from the seed answers, plus (if `eft`) EFT from the import's human rankings when it has
    any, else the synthetic 5/2/0 examples. Returns (rows, counts for the stage's stats)."""
    seeds = seeds_from_registry(reg, seeds_sid)
    examples = ift_examples(seeds)
    counts: dict = {"ift": len(seeds), "eft": 0, "eft_source": None}
    if eft:
        ranked = [p for p in ranked_from_registry(reg, seeds_sid) if p.ranked_replies()]
        if ranked:
            rows = eft_from_rankings(ranked, judge_template, seed, verdict_only=verdict_only)
            counts["eft_source"] = "human_rankings"
        else:
            rows, counts["eft_source"] = eft_examples(seeds, judge_template, seed, verdict_only), "synthetic"
        examples += rows
        counts["eft"] = len(rows)
        scores = Counter(parse_score(r["completion"]).score for r in rows)
        counts["eft_scores"] = {str(int(k)): v for k, v in sorted(scores.items())}
    return examples, counts


def fit_sft(cfg: FlywheelConfig, job: TrainJob, model, tokenizer, **common) -> dict:
    s = dict(job.settings)
    lora = LoraConfig.model_validate(s.pop("lora")) if s.get("lora") else None
    metrics = loops().sft_train(model, tokenizer, job.rows, lora=lora, tracking=job.tracking, **s, **common)
    return {**metrics, "lora": bool(lora and lora.enabled)} if "lora" in job.settings else metrics


# --- M1 --------------------------------------------------------------------------------------------------------------

NOT_IN_KEY = {"lora", "mode", "cold_start_examples"}  # settings in the SFT stages' keys only where they apply


def train_m1(ctx: StageContext, state: IterationState) -> StageResult:
    """M1: SFT of the base model (`state.pt`) on IFT (seed answers) and, by default, EFT (judge-training) examples.
    `sft.mode`: 'skip' registers the base itself as M1 (no training: R1-Zero, RL straight from the base);
    'cold_start' trains on only the first `sft.cold_start_examples` seed answers, no EFT (R1's cold start)."""
    cfg = ctx.cfg
    if cfg.sft.mode == "skip":
        return base_as_m1(ctx, state)
    with ctx.registry() as reg:
        judge_text, judge_hash = load_template(reg, cfg.judge.template, "judge")
    lora = cfg.sft.lora.resolved(resolve_device(cfg.run.device), cfg.scratch)
    cold = cfg.sft.mode == "cold_start"
    inputs = {"base": state.pt, "seeds": state.seeds, "sft": cfg.sft.model_dump(exclude=NOT_IN_KEY),
              "eft": cfg.seeds.eft and not cold, "judge_template": judge_hash, "seed": cfg.run.seed}
    if cold:
        inputs["cold_start_examples"] = cfg.sft.cold_start_examples
    if lora.enabled:
        inputs["lora"] = lora.model_dump(mode="json")
    verdict_only = cfg.judge.mode == "prob"  # the probability judge reads the score right after 'Score:'
    if verdict_only:
        inputs["eft_target"] = "verdict_only"
    s = cfg.sft

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        examples, counts = sft_examples(reg, state.seeds, judge_text, eft=cfg.seeds.eft and not cold,
                                        seed=cfg.run.seed, verdict_only=verdict_only)
        if cold:  # the first seed chains, in the seed file's order
            examples = examples[:cfg.sft.cold_start_examples]
            counts = {**counts, "ift": len(examples), "cold_start": True}
        settings = {"epochs": s.epochs, "lr": s.learning_rate, "batch_size": s.batch_size, "max_length": s.max_length,
                    "micro_batch_size": s.micro_batch_size, "lora": lora.model_dump(mode="json")}
        job = TrainJob("sft", model_path(reg, state.pt), str(reg.model_dir(sid)), examples, settings=settings)
        return job, {"dataset_version": f"sft-{content_hash(examples)}", "stats": counts}

    return train_stage(ctx, M1_SFT, state.pt, inputs, make_job)


def base_as_m1(ctx: StageContext, state: IterationState) -> StageResult:
    """sft.mode=skip: M1 is the base model, registered again under the name M1 (same folder, same weights hash), so
    every later stage, the report and `flywheel experiment` read the chain PT -> M1 -> M2 as in any run."""
    from ..stage import run_stage

    def work(reg: Registry, sid: str) -> dict:
        base = reg.model(state.pt)
        path = model_path(reg, state.pt)  # present and unaltered
        reg.register_model(model_id=sid, run_id=ctx.run_id, name="M1", kind="base", iteration=0,
                           parent_id=state.pt, path=base["path"], stage_run_id=sid, config_hash=ctx.cfg.config_hash(),
                           metrics={"sft": "skipped (sft.mode=skip)"}, weights_sha256=base["weights_sha256"])
        return {"model_id": sid, "path": path, "sft": "skipped"}

    return run_stage(ctx.cfg, "sft", ctx.run_id, 0, state.pt, {"base": state.pt, "mode": "skip"}, work)


# --- the plain-SFT baseline (trainer 'sft') ------------------------------------------------------------------------

def baseline_budget(cfg: FlywheelConfig) -> int:
    """Examples per iteration of the plain-SFT baseline (`sft.baseline_examples`, see its description)."""
    return cfg.sft.baseline_examples or 2 * cfg.self_instruct.num_prompts * max(1, round(cfg.dpo.epochs))


def baseline_learning_rate(cfg: FlywheelConfig) -> float:
    """The plain-SFT baseline's learning rate: `sft.baseline_learning_rate`, else DPO's."""
    return cfg.sft.baseline_learning_rate or cfg.dpo.learning_rate


def train_baseline(ctx: StageContext, state: IterationState) -> StageResult:
    """The plain-SFT baseline: M_{t+1} = M_t fine-tuned further on M1's own SFT data (the seeds' IFT and EFT), with
    no generation, judging or pairs; kind "sft". It gets `baseline_budget` examples per iteration (the seed examples
    in a seeded shuffle, cycled), so it trains on as many sequences as a DPO iteration can, at DPO's batch size and
    (unless `sft.baseline_learning_rate` is set) learning rate, for one pass."""
    cfg, model_id = ctx.cfg, state.model
    with ctx.registry() as reg:
        judge_text, judge_hash = load_template(reg, cfg.judge.template, "judge")
    budget = baseline_budget(cfg)
    inputs = {"model": model_id, "seeds": state.seeds, "sft": cfg.sft.model_dump(mode="json", exclude=NOT_IN_KEY - {"lora"}),
              "examples": budget,
              "lr": baseline_learning_rate(cfg), "batch_size": cfg.dpo.batch_size,
              "eft": cfg.seeds.eft, "judge_template": judge_hash, "seed": cfg.run.seed}

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        examples, counts = sft_examples(reg, state.seeds, judge_text, eft=cfg.seeds.eft, seed=cfg.run.seed,
                                        verdict_only=cfg.judge.mode == "prob")
        order = list(range(len(examples)))
        random.Random(content_hash([sid, cfg.run.seed])).shuffle(order)
        rows = [examples[order[i % len(order)]] for i in range(budget)] if examples else []
        settings = {"epochs": 1, "lr": baseline_learning_rate(cfg), "batch_size": cfg.dpo.batch_size,
                    "max_length": cfg.sft.max_length}
        job = TrainJob("sft", model_path(reg, model_id), str(reg.model_dir(sid)), rows, settings=settings)
        return job, {"dataset_version": f"sft-{content_hash(rows)}",
                     "stats": {"examples": len(rows), "seed_examples": len(examples), "ift": counts["ift"],
                               "eft": counts["eft"]}}

    return train_stage(ctx, BASELINE, model_id, inputs, make_job)


# --- rejection-sampling SFT (trainer 'rs-sft') ---------------------------------------------------------------------

def best_of_n(scored: list[dict], min_score: float | None = None) -> tuple[list[dict], int]:
    """Per prompt, the row with the highest `score` (ties: the larger candidate_id, as the pairs stage breaks them).
    Returns (the best rows at or above `min_score`, how many prompts' best fell below it)."""
    best: dict[str, dict] = {}
    for row in scored:
        cur = best.get(row["prompt_id"])
        if cur is None or (row["score"], row["candidate_id"]) > (cur["score"], cur["candidate_id"]):
            best[row["prompt_id"]] = row
    chosen = [best[p] for p in sorted(best)]
    kept = [r for r in chosen if min_score is None or r["score"] >= min_score]
    return kept, len(chosen) - len(kept)


def train_rs_sft(ctx: StageContext, state: IterationState) -> StageResult:
    """Rejection-sampling fine-tuning: SFT of M_t on the best candidate per prompt by the combined score
    (`flywheel.stages.pairs.combined_scores` over `state.judgments` and `state.rewards`); kind "rs-sft". `min_score` is on
    the combined score's scale (the judge's 0-5 when it is the only signal, else a weighted sum of per-prompt
    z-scores)."""
    from ..stages.pairs import combined_scores

    cfg, model_id = ctx.cfg, state.model
    c = cfg.rs_sft
    inputs = {"model": model_id, "judgments": state.judgments, "rewards": state.rewards,
              "cfg": c.model_dump(mode="json"), "weights": cfg.reward.weights, "seed": cfg.run.seed}

    def make_job(reg: Registry, sid: str) -> tuple[TrainJob, dict]:
        scored = combined_scores(reg, cfg, judge_sid=state.judgments, reward_sid=state.rewards)
        kept, below = best_of_n(scored, c.min_score)
        if not kept:
            raise NoTrainingDataError(
                f"rs-sft (iteration {ctx.iteration}): no candidate to train on ({len(scored)} scored, {below} "
                f"prompts' best below rs_sft.min_score={c.min_score}); see the judge stage's parse failures")
        rows = [{"prompt_id": r["prompt_id"], "candidate_id": r["candidate_id"], "score": float(r["score"]),
                 "prompt": r["prompt"], "completion": r["text"]} for r in kept]
        settings = {"epochs": c.epochs, "lr": c.learning_rate, "batch_size": c.batch_size, "max_length": c.max_length}
        job = TrainJob("rs-sft", model_path(reg, model_id), str(reg.model_dir(sid)),
                       [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows], settings=settings)
        return job, {"dataset_version": f"rs-sft-{content_hash(rows)}",
                     "stats": {"examples": len(rows), "prompts_scored": len({r["prompt_id"] for r in scored}),
                               "below_min_score": below,
                               "mean_score": round(sum(r["score"] for r in rows) / len(rows), 4)}}

    return train_stage(ctx, RS_SFT, model_id, inputs, make_job)


M1_SFT = Trainer("sft", section="sft", consumes=("seeds",), stage=train_m1, fit=fit_sft)
BASELINE = Trainer("sft", section="sft", consumes=("seeds",), stage=train_baseline, fit=fit_sft)
RS_SFT = Trainer("rs-sft", section="rs_sft", consumes=("judgments", "rewards"), stage=train_rs_sft, fit=fit_sft)
