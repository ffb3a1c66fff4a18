"""Prefect flows over the library: one task per stage, a flow per iteration, a parent flow for the whole run.

No logic lives here. The registry decides what is already done (each library stage skips finished work), so Prefect
caching is off: re-running the flow, in this process or a new one, is what resumes a run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flywheel import bootstrap, dpo, generate, judge, pairs, ppo, report, reward_stage, runs, self_instruct, trainers
from flywheel.config import FlywheelConfig
from flywheel.registry import Registry
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
    "sft": _task(trainers.train_seed_sft, "train-sft-baseline"),
}


@flow(name="flywheel-iteration", flow_run_name="iteration-{iteration}")
def iteration_flow(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, seeds_sid: str,
                   earlier_prompt_sids: list[str], pt_id: str, m1_id: str) -> dict:
    """M_t -> M_{t+1}: self-instruct, generate, judge (unless reward.weights leaves it out), [reward], pairs, then the
    iteration's trainer. The plain-SFT baseline (trainer 'sft') skips straight to training."""
    runs.start_iteration(cfg, run_id, iteration, model_id)
    trainer = cfg.train.trainer_for(iteration)
    train = train_tasks[trainer]
    if trainer == "sft":
        trained = train(cfg, run_id, iteration, model_id, seeds_sid)
        runs.finish_iteration(cfg, run_id, iteration, trained.stats["model_id"])
        return {"model_id": trained.stats["model_id"], "prompts_sid": None}
    prompts = self_instruct_task(cfg, run_id, iteration, model_id, seeds_sid, earlier_prompt_sids)
    candidates = generate_task(cfg, run_id, iteration, model_id, prompts.stage_run_id)
    judge_sid = None
    if "judge" in cfg.reward.weights:  # a weight of 0 keeps the judge for the report's monitors, out of the pairs
        judge_sid = judge_task(cfg, run_id, iteration, model_id, candidates.stage_run_id).stage_run_id
    reward_sid = None
    if cfg.reward.coherent or cfg.reward.rules:
        reward_sid = reward_task(cfg, run_id, iteration, candidates.stage_run_id, m1_id, pt_id).stage_run_id
    pair_set = pairs_task(cfg, run_id, iteration, judge_sid, reward_sid)
    if trainer == "dpo":
        trained = train(cfg, run_id, iteration, model_id, pair_set, m1_id)
    elif trainer == "rs-sft":
        trained = train(cfg, run_id, iteration, model_id, judge_sid, reward_sid)
    else:  # online RL on the iteration's prompts: ppo, grpo, rloo
        trained = train(cfg, run_id, iteration, model_id, prompts.stage_run_id, m1_id, pt_id)
    runs.finish_iteration(cfg, run_id, iteration, trained.stats["model_id"])
    return {"model_id": trained.stats["model_id"], "prompts_sid": prompts.stage_run_id}


@flow(name="flywheel")
def flywheel_flow(cfg: FlywheelConfig) -> str:
    """Seeds -> PT -> M1, then `run.iterations` iterations: M1 -> M2 -> ... Returns the run id."""
    already_done = runs.status(cfg, runs.run_id_for(cfg)) == "done"  # a re-run of a finished run changes nothing
    run_id = runs.start_run(cfg)
    try:
        seeds = seeds_task(cfg, run_id)
        base = base_task(cfg, run_id, seeds.stage_run_id)
        pt_id = base.stats["model_id"]
        m1_id = sft_task(cfg, run_id, pt_id, seeds.stage_run_id).stats["model_id"]
        model_id, earlier = m1_id, []
        for t in range(1, cfg.run.iterations + 1):
            done = runs.finished_iteration(cfg, run_id, t)
            out = done or iteration_flow(cfg, run_id, t, model_id, seeds.stage_run_id, earlier, pt_id, m1_id)
            model_id = out["model_id"]
            if out["prompts_sid"]:
                earlier.append(out["prompts_sid"])
            if not done:
                warn_monitors(cfg, run_id, t)
    except BaseException:
        runs.finish_run(cfg, run_id, "failed")
        raise
    runs.finish_run(cfg, run_id, "done")
    publish_report(cfg, run_id, plots=not already_done)
    return run_id


def warn_monitors(cfg: FlywheelConfig, run_id: str, iteration: int) -> None:
    """Log each reward-hacking monitor that fired on this iteration as a warning in the flow run's log."""
    with Registry(cfg.registry.root) as reg:
        fired = report.warnings_for(reg, run_id, iteration)
    for c in fired:
        get_run_logger().warning("monitor %s (%s), iteration %d: %s", c.name, c.failure_mode, iteration, c.message)


def publish_report(cfg: FlywheelConfig, run_id: str, plots: bool = True) -> None:
    """Write the run's report (Markdown + PNG plots in the registry; kept as it is on a re-run of a finished run that
    has one) and attach it to the flow run as an artifact."""
    with Registry(cfg.registry.root) as reg:
        if plots or not (report.report_dir(reg, run_id) / "report.md").is_file():
            report.write(reg, run_id)
        text = report.markdown(reg, run_id)
    create_markdown_artifact(markdown=text, key="flywheel-report", description=f"flywheel report of run {run_id}")
