"""Run one training job in this process: what `accelerate launch` starts when `train.launch.mode` is `accelerate`
(and what each Ray Train worker runs in mode `ray`, through `train_folder`: see launch.py).

    python -m flywheel.training.entry dpo --config JOB/config.json --job JOB
    accelerate launch --cpu --num_processes 1 -m flywheel.training.entry rs-sft --config JOB/config.json --job JOB

JOB is a folder written by `TrainJob.write` (job.json: trainer, model paths, output folder, settings; rows.parquet:
the training rows). The job is run by `flywheel.training.job.run_job` with the trainer's `fit` from the table, the
same code as in-process training: the model is saved to the job's output folder and the main process writes
JOB/metrics.json (with "world_size": how many processes trained). Nothing here touches the registry. Exit status 0
on success, 2 for a bad config or job folder (with a one-line reason), 1 if training fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ..config import ConfigError, load_config
    from . import TRAINERS
    from .job import TrainJob

    fits = {name: t.fit for name, t in TRAINERS.items()}  # M1's SFT is trainer 'sft' too: the same fit
    parser = argparse.ArgumentParser(prog="python -m flywheel.training.entry", description=__doc__.split("\n")[0])
    parser.add_argument("trainer", choices=sorted(fits))
    parser.add_argument("--config", required=True, help="the run's config (YAML or JSON)")
    parser.add_argument("--job", required=True, type=Path, help="the job folder (job.json, rows.parquet)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        job = TrainJob.read(args.job)
    except (ConfigError, OSError, ValueError, TypeError) as e:
        print(f"flywheel.training.entry: error: {e}", file=sys.stderr)
        return 2
    if job.trainer != args.trainer:
        print(f"flywheel.training.entry: error: {args.job}/job.json is a {job.trainer!r} job, not {args.trainer!r}",
              file=sys.stderr)
        return 2

    train_folder(cfg, job, fits[job.trainer], args.job)
    return 0


def train_folder(cfg, job, fit, folder: Path) -> dict:
    """Run `job` with `fit` (`run_job`: M_{t+1} saved to job.out_dir) in every process of the distributed run this
    process belongs to (an `accelerate launch` child, or a Ray Train worker in mode ray), record how many processes
    trained ("world_size"), and have the main one write `folder`/metrics.json. Returns the metrics."""
    from accelerate import PartialState

    from .common import run_job

    metrics = run_job(cfg, job, fit)
    state = PartialState()  # the state the HF Trainer trained under: its processes split the batches
    metrics["world_size"] = state.num_processes
    if state.is_main_process:
        tmp = Path(folder) / f".metrics.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp, Path(folder) / "metrics.json")
    return metrics


if __name__ == "__main__":
    sys.exit(main())
