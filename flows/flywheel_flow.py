"""Prefect flows over the library: one task per stage, a flow per iteration, a parent flow for the whole run.

No logic lives here. The registry decides what is already done (each library stage skips finished work), so Prefect
caching is off: re-running the flow, in this process or a new one, is what resumes a run.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flywheel import bootstrap, dpo, generate, judge, pairs, ppo, reward_stage, runs, self_instruct, trainers
from flywheel.config import FlywheelConfig
from flows.nightly import retry_transient


def _task(fn, name: str):
    # Retried only after a failure that waiting can fix (flywheel.schedule.is_transient); a retried stage resumes
    # from its last committed batch.
    return task(fn, name=name, cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(10),
                retry_jitter_factor=0.5, retry_condition_fn=retry_transient)


seeds_task = _task(bootstrap.import_seeds, "seeds")
base_task = _task(bootstrap.build_base, "base-model")
sft_task = _task(bootstrap.train_sft, "sft-M1")
self_instruct_task = _task(self_instruct.self_instruct, "self-instruct")
generate_task = _task(generate.generate, "generate")
judge_task = _task(judge.judge, "judge")
reward_task = _task(reward_stage.reward, "reward")
pairs_task = _task(pairs.build_pairs, "pairs")
train_tasks = {
    "dpo": _task(dpo.train_dpo, "train-dpo"),
    "ppo": _task(ppo.train_ppo, "train-ppo"),
    "grpo": _task(trainers.train_grpo, "train-grpo"),
    "rloo": _task(trainers.train_rloo, "train-rloo"),
    "rs-sft": _task(trainers.train_rs_sft, "train-rs-sft"),
}


@flow(name="flywheel-iteration", flow_run_name="iteration-{iteration}")
def iteration_flow(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, seeds_sid: str,
                   earlier_prompt_sids: list[str], pt_id: str, m1_id: str) -> dict:
    """M_t -> M_{t+1}: self-instruct, generate, judge, [reward], pairs, then the iteration's trainer."""
    runs.start_iteration(cfg, run_id, iteration, model_id)
    prompts = self_instruct_task(cfg, run_id, iteration, model_id, seeds_sid, earlier_prompt_sids)
    candidates = generate_task(cfg, run_id, iteration, model_id, prompts.stage_run_id)
    judged = judge_task(cfg, run_id, iteration, model_id, candidates.stage_run_id)
    reward_sid = None
    if cfg.reward.coherent or cfg.reward.rules:
        reward_sid = reward_task(cfg, run_id, iteration, candidates.stage_run_id, m1_id, pt_id).stage_run_id
    pair_set = pairs_task(cfg, run_id, iteration, judged.stage_run_id, reward_sid)
    trainer = cfg.train.trainer_for(iteration)
    train = train_tasks[trainer]
    if trainer == "dpo":
        trained = train(cfg, run_id, iteration, model_id, pair_set, m1_id)
    elif trainer == "rs-sft":
        trained = train(cfg, run_id, iteration, model_id, judged.stage_run_id, reward_sid)
    else:  # online RL on the iteration's prompts: ppo, grpo, rloo
        trained = train(cfg, run_id, iteration, model_id, prompts.stage_run_id, m1_id, pt_id)
    runs.finish_iteration(cfg, run_id, iteration, trained.stats["model_id"])
    return {"model_id": trained.stats["model_id"], "prompts_sid": prompts.stage_run_id}


@flow(name="flywheel")
def flywheel_flow(cfg: FlywheelConfig) -> str:
    """Seeds -> PT -> M1, then `run.iterations` iterations: M1 -> M2 -> ... Returns the run id."""
    run_id = runs.start_run(cfg)
    try:
        seeds = seeds_task(cfg, run_id)
        base = base_task(cfg, run_id, seeds.stage_run_id)
        pt_id = base.stats["model_id"]
        m1_id = sft_task(cfg, run_id, pt_id, seeds.stage_run_id).stats["model_id"]
        model_id, earlier = m1_id, []
        for t in range(1, cfg.run.iterations + 1):
            out = iteration_flow(cfg, run_id, t, model_id, seeds.stage_run_id, earlier, pt_id, m1_id)
            model_id = out["model_id"]
            earlier.append(out["prompts_sid"])
    except BaseException:
        runs.finish_run(cfg, run_id, "failed")
        raise
    runs.finish_run(cfg, run_id, "done")
    return run_id
