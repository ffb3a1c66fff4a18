"""Trainers: M_t -> M_{t+1} (and the base -> M1). The table below is the one list of them.

    from flywheel.training import TRAINERS
    TRAINERS["dpo"].stage(ctx, state)      # what the pipeline calls for `train.trainer: dpo`

Each trainer is one module that declares a `Trainer` (flywheel/training/job.py): its name, its config section, what
it trains on, its stage (read rows, build a TrainJob, `train_stage`) and its fit (train a loaded model on a job).
`train_stage` does the rest alike for all: run the job here or in an `accelerate launch` child (launch.py, entry.py),
save atomically, register the model. `loops.py` holds the calls into TRL.

To add a trainer: write `flywheel/training/<name>.py` with its stage, fit and `Trainer(...)`, add it to TRAINERS
below, and give `FlywheelConfig` its section (flywheel/config.py).
"""

from __future__ import annotations

from . import dpo, online, ppo, sft
from .job import NoTrainingDataError, Trainer, TrainJob

TRAINERS: dict[str, Trainer] = {t.name: t for t in (
    dpo.TRAINER,
    ppo.TRAINER,
    online.GRPO,
    online.RLOO,
    sft.RS_SFT,
    sft.BASELINE,      # 'sft': the plain-SFT baseline on the seed data
)}
M1_SFT = sft.M1_SFT    # iteration 0: the base model -> M1

__all__ = ["M1_SFT", "NoTrainingDataError", "TRAINERS", "TrainJob", "Trainer"]
