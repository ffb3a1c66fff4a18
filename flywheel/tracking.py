"""Experiment tracking (`train.report_to`): the trainers' own metrics and each iteration's report figures, in the
tracker the user already has. No Prefect here.

    check(cfg.train.report_to)                        # preflight: the tracker's package is installed, else ConfigError
    with training(cfg, run_id, "M2-dpo") as args:     # a training stage: TRL's report_to, run_name, project; and
        ...                                           #   the variables transformers' callbacks read (a child inherits)
    log_iteration(reg, cfg, run_id, iteration)        # after an iteration: its report figures, step = the iteration

`none` (the default) writes nothing and needs no account. `tensorboard` writes event files under
<registry>/tracking/<run_id>/: the iteration figures there, each training stage's in <run_id>/<model>-<trainer>/
(`tensorboard --logdir <registry>/tracking`). `mlflow` logs to MLFLOW_TRACKING_URI, else the SQLite store
<registry>/tracking/mlflow.db; `wandb` and `trackio` by their own settings. The experiment or project is `run.name`
unless MLFLOW_EXPERIMENT_NAME or WANDB_PROJECT says otherwise. The iteration figures are the report's
(flywheel/analysis/report.py `collect`, the monitors' `evaluate`): `report/<figure>`, `training/<metric>` and
`monitors/<check>` (1 fired, 0 not) with `monitors/fired`, tagged with the run id, the trainer and the model ids.
A tracker that fails while logging is a warning: the registry and the report hold everything.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .analysis import report
from .analysis.monitors import evaluate
from .config import ConfigError, FlywheelConfig
from .registry import Registry

log = logging.getLogger("flywheel")

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
# The report's figures sent per iteration, beside the trained model's metrics and the monitors.
FIGURES = [*(key for key, _, _ in report.MAIN), "prompts_made", "judge_samples", "parse_failures",
           "scored_candidates", "distinct_1"]


def check(report_to: str) -> None:
    """Refuse a tracker whose package is not installed, before any work (transformers would fail at the first
    trainer, after the generation and judging)."""
    package = PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"train.report_to: {report_to!r} needs the {package!r} package, which is not installed: "
                          f"pip install {package} (or set train.report_to=none)")


def tracking_dir(cfg: FlywheelConfig, run_id: str) -> Path:
    return Path(cfg.registry.root) / "tracking" / run_id


def project(cfg: FlywheelConfig) -> str:
    return cfg.run.name


def mlflow_uri(cfg: FlywheelConfig) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = Path(cfg.registry.root).resolve() / "tracking" / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


@contextmanager
def training(cfg: FlywheelConfig, run_id: str, label: str) -> Iterator[dict]:
    """Yields the training arguments of the stage `label` (e.g. "M2-dpo") for TRL: report_to, run_name, project.
    Within the block the environment holds what transformers' callbacks read: tensorboard's logging dir (always this
    stage's own), mlflow's store and experiment, wandb's project and folder (those two kept if the user set them)."""
    to = cfg.train.report_to
    if to == "none":
        yield {"report_to": "none"}
        return
    folder = tracking_dir(cfg, run_id)
    env = {"TENSORBOARD_LOGGING_DIR": str(folder / label)} if to == "tensorboard" else {}
    if to == "mlflow":
        env |= {"MLFLOW_TRACKING_URI": mlflow_uri(cfg),
                "MLFLOW_EXPERIMENT_NAME": os.environ.get("MLFLOW_EXPERIMENT_NAME", project(cfg))}
    if to == "wandb":
        folder.mkdir(parents=True, exist_ok=True)
        env |= {"WANDB_PROJECT": os.environ.get("WANDB_PROJECT", project(cfg)),
                "WANDB_DIR": os.environ.get("WANDB_DIR", str(folder))}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield {"report_to": to, "run_name": f"{run_id}-{label}", "project": project(cfg)}
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def iteration_figures(reg: Registry, run_id: str, iteration: int) -> tuple[dict[str, float], dict[str, str]]:
    """The report's figures of `iteration` as scalars, and its tags (run id, trainer, the models in and out: names
    and ids)."""
    iterations = report.collect(reg, run_id)
    it = next(i for i in iterations if i["iteration"] == iteration)
    checks = [c for c in evaluate(iterations, report.monitors_config(reg, run_id)) if c.iteration == iteration]
    scalars = {f"report/{k}": float(it[k]) for k in FIGURES if isinstance(it.get(k), (int, float))}
    scalars |= {f"training/{k}": float(v) for k, v in it["training"].items()}
    scalars |= {f"monitors/{c.name}": float(c.status == "WARN") for c in checks if c.status != "n/a"}
    scalars["monitors/fired"] = float(sum(c.status == "WARN" for c in checks))
    models = reg.rows("SELECT model_in, model_out FROM iterations WHERE run_id = ? AND iteration = ?",
                      [run_id, iteration])
    tags = {"run_id": run_id, "trainer": it["trainer"], "models": f"{it['model_in']} -> {it['model_out']}",
            **(models[0] if models else {})}
    return scalars, {k: str(v) for k, v in tags.items()}


def log_iteration(reg: Registry, cfg: FlywheelConfig, run_id: str, iteration: int) -> None:
    """Send a finished iteration's figures to `train.report_to`, step = the iteration. Never raises."""
    to = cfg.train.report_to
    if to == "none":
        return
    try:
        scalars, tags = iteration_figures(reg, run_id, iteration)
        WRITERS[to](cfg, run_id, iteration, scalars, tags)
    except Exception as e:  # the run goes on: its figures are in the registry and the report
        log.warning("train.report_to=%s: iteration %d's figures were not logged (%s: %s); the report has them",
                    to, iteration, type(e).__name__, e)


def _tensorboard(cfg, run_id, iteration, scalars, tags) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tracking_dir(cfg, run_id))) as writer:
        for key, value in scalars.items():
            writer.add_scalar(key, value, iteration)
        writer.add_text("tags", "  \n".join(f"{k}: {v}" for k, v in tags.items()), iteration)


def _mlflow(cfg, run_id, iteration, scalars, tags) -> None:
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri(cfg))
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", project(cfg)))
    found = mlflow.search_runs(filter_string=f"tags.flywheel_run_id = '{run_id}'", output_format="list")
    with mlflow.start_run(run_id=found[0].info.run_id if found else None, run_name=run_id):
        mlflow.set_tags({"flywheel_run_id": run_id, **{f"iteration_{iteration}.{k}": v for k, v in tags.items()}})
        mlflow.log_metrics(scalars, step=iteration)


def _wandb(cfg, run_id, iteration, scalars, tags) -> None:
    import wandb

    folder = tracking_dir(cfg, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", project(cfg)), id=run_id, name=run_id, resume="allow",
                     dir=os.environ.get("WANDB_DIR", str(folder)))
    try:
        run.config.update({f"iteration_{iteration}": tags}, allow_val_change=True)
        run.log(scalars, step=iteration)
    finally:
        run.finish()


def _trackio(cfg, run_id, iteration, scalars, tags) -> None:
    import trackio

    trackio.init(project=project(cfg), name=run_id, resume="allow", config={f"iteration_{iteration}": tags})
    try:
        trackio.log(scalars, step=iteration)
    finally:
        trackio.finish()


WRITERS = {"tensorboard": _tensorboard, "mlflow": _mlflow, "wandb": _wandb, "trackio": _trackio}
