"""Prefect over the pipeline: `flywheel.pipeline.run` as a flow, each iteration as a subflow, each step as a task.

No logic lives here: the pipeline decides the steps and their order (flywheel/pipeline.py), and the registry decides
what is already done (each stage skips finished work), so Prefect caching is off: running the flow again, in this
process or a new one, is what resumes a run.
"""

from __future__ import annotations

import logging

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flywheel import pipeline
from flywheel.analysis import report
from flywheel.config import FlywheelConfig
from flywheel.registry import Registry
from flywheel.schedule import is_transient
from flywheel.stage import IterationState, StageContext, Step
from flywheel.registry.integrity import ModelIntegrityError, NonFiniteModelError
from flywheel.training import NoTrainingDataError

EXPLAINED = (NoTrainingDataError, ModelIntegrityError, NonFiniteModelError)


def retry_transient(task, task_run, state) -> bool:
    """A Prefect `retry_condition_fn`: go on to the task's retries only if its failure is transient
    (`flywheel.schedule.is_transient`); a retried stage resumes from its last committed batch."""
    try:
        error = state.result(raise_on_failure=False)
    except Exception:  # the result could not be read: do not guess
        return False
    return is_transient(error if isinstance(error, BaseException) else None)


class WithoutTraceback(logging.Filter):
    """Prefect logs a failed flow run's exception with its traceback, once per flow level. A failure that explains
    itself (no training data, a damaged or non-finite model: the message says what to change or restore) is logged
    as its message alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPLAINED):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(WithoutTraceback())

_tasks: dict[str, object] = {}


def as_task(step: Step, ctx: StageContext, state: IterationState) -> IterationState:
    """`pipeline.Call` that runs the step as a Prefect task named after its stage."""
    if step.name not in _tasks:
        _tasks[step.name] = task(pipeline.call_here, name=step.name, cache_policy=NO_CACHE, retries=2,
                                 retry_delay_seconds=exponential_backoff(10), retry_jitter_factor=0.5,
                                 retry_condition_fn=retry_transient)
    return _tasks[step.name](step, ctx, state)


@flow(name="flywheel-iteration", flow_run_name="iteration-{iteration}", validate_parameters=False)
def iteration_flow(cfg: FlywheelConfig, run_id: str, iteration: int, state: IterationState,
                   call: pipeline.Call | None = None) -> IterationState:
    """M_t -> M_{t+1}: `pipeline.run_iteration`, each step a task (`call` is there for `pipeline.run`'s `iterate`
    signature; the steps always run through `as_task`)."""
    return pipeline.run_iteration(cfg, run_id, iteration, state, as_task)


@flow(name="flywheel", validate_parameters=False)
def flywheel_flow(cfg: FlywheelConfig) -> str:
    """`pipeline.run`: seeds -> PT -> M1, then `run.iterations` iterations, then the report, which is also attached
    to the flow run as an artifact. Returns the run id."""
    run_id = pipeline.run(cfg, call=as_task, iterate=iteration_flow)
    with Registry(cfg.registry.root) as reg:
        text = report.markdown(reg, run_id)
    create_markdown_artifact(markdown=text, key="flywheel-report", description=f"flywheel report of run {run_id}")
    return run_id
