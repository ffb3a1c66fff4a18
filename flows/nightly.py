"""The nightly flow: each scheduled run takes a config's latest model one iteration further.

`flywheel schedule --cron ...` registers this flow as a Prefect deployment (flows/schedule.py) with the config's path,
its overrides and the directory it was registered from; `flywheel schedule serve` runs the deployments' flow runs as
they come due. Each run holds the registry lock, asks the registry how many iterations that config has finished
(`flywheel.schedule.next_iteration`), and runs the flywheel flow with one more: finished iterations are skipped stage
by stage, so only the new iteration computes. The flywheel run shows up in the UI as a subflow of the nightly run.

Retries: the planning task retries what a wait can fix (`retry_transient`, e.g. the DuckDB file briefly open in a
reader); the flow retries once after 15 minutes, which covers a registry held by a run someone started by hand. A
failure that would repeat (a bad config, no pairs) fails the same way on the retry, quickly, since finished stages are
skipped, and the next night tries again from where it stopped.
"""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows.flywheel_flow import flywheel_flow, retry_transient
from flywheel.config import load_config
from flywheel.pipeline import preflight
from flywheel.registry.lock import registry_lock
from flywheel.schedule import NextIteration, next_iteration

FLOW_NAME = "flywheel-nightly"


@task(name="plan-next-iteration", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=exponential_backoff(5),
      retry_condition_fn=retry_transient)
def plan_task(cfg) -> NextIteration:
    return next_iteration(cfg)


@flow(name=FLOW_NAME, retries=1, retry_delay_seconds=900)
def nightly_flow(config: str | None = None, overrides: list[str] | None = None, workdir: str | None = None) -> dict:
    """One more iteration of the config `config` + `overrides`, read in `workdir` (where it was scheduled from)."""
    log = get_run_logger()
    if workdir:
        os.chdir(workdir)  # the config's relative paths (seeds, templates, registry) are relative to it
    cfg = load_config(config, overrides or [])
    with registry_lock(cfg.registry.root, f"nightly {cfg.run.name}"):
        plan = plan_task(cfg)
        log.info("%s: %d iteration(s) finished (latest model %s); running iteration %d as run %s",
                 cfg.run.name, plan.finished, plan.latest_model or "none", plan.finished + 1, plan.run_id)
        preflight(plan.cfg)
        flywheel_flow(plan.cfg)  # a failure fails this flow run; finished stages are kept for the next one
    return {"run_id": plan.run_id, "iteration": plan.finished + 1, "registry": str(cfg.registry.root)}
