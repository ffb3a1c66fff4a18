"""Run one training job in this process: what `accelerate launch` starts when `train.launch.mode` is `accelerate`.

    python -m flywheel.training.entry dpo --config JOB/config.json --job JOB
    accelerate launch --cpu --num_processes 1 -m flywheel.training.entry rs-sft --config JOB/config.json --job JOB

JOB is a folder written by `TrainJob.write` (job.json: trainer, model paths, output folder, settings; rows.parquet:
the training rows). The job is run by `flywheel.training.job.run_job` with the trainer's `fit` from the table, the
same code as in-process training: the model is saved to the job's output folder and the main process writes
JOB/metrics.json. Nothing here touches the registry. Exit status 0 on success, 2 for a bad config or job folder (with
a one-line reason), 1 if training fails.
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
    from .common import run_job
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

    from accelerate import PartialState

    metrics = run_job(cfg, job, fits[job.trainer])
    if PartialState().is_main_process:
        tmp = args.job / f".metrics.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(metrics, indent=1))
        os.replace(tmp, args.job / "metrics.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
