"""What a trainer is (`Trainer`, an entry of the table in flywheel/training/__init__.py) and what it runs (`TrainJob`).

    TRAINER = Trainer("dpo", section="dpo", consumes=("pairs",), stage=train_dpo, fit=fit_dpo)

A TrainJob is one training run in plain values (the rows, the model paths, the settings it trains with), so it can be
written to a folder and run by an `accelerate launch` child. What every trainer's stage does with it is in common.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..stage import IterationState, StageContext, StageResult


class NoTrainingDataError(RuntimeError):
    """A trainer stage found nothing to train on (no pairs, no kept prompts, no candidate above the bar); the message
    says where to look. The run stops; finished stages are kept."""


@dataclass
class TrainJob:
    """One training run in plain values, so it can be written to a folder and run by an `accelerate launch` child."""

    trainer: str                     # the Trainer's name: which `fit` runs it
    model_path: str                  # M_t
    out_dir: str                     # where M_{t+1} is saved
    rows: list[dict] = field(default_factory=list)
    ref_path: str | None = None      # DPO: a reference other than M_t (M1)
    sft_path: str | None = None      # the coherent reward (GRPO/RLOO/PPO): the SFT and PT models
    pt_path: str | None = None
    settings: dict = field(default_factory=dict)  # what `fit` trains with, when not simply the trainer's config section
    tracking: dict = field(default_factory=dict)  # TRL's report_to, run_name, project (flywheel.tracking.training)

    def write(self, folder: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows), folder / "rows.parquet")
        (folder / "job.json").write_text(json.dumps({k: v for k, v in asdict(self).items() if k != "rows"}, indent=1))

    @classmethod
    def read(cls, folder: Path) -> "TrainJob":
        import pyarrow.parquet as pq

        for name in ("job.json", "rows.parquet"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"training job folder {folder} has no {name}")
        return cls(**json.loads((folder / "job.json").read_text()),
                   rows=pq.read_table(folder / "rows.parquet").to_pylist())


# fit(cfg, job, model, tokenizer, device, seed, save_dir) -> metrics: train the loaded M_t on job.rows and save it to
# save_dir. What belongs in the model's train_config rather than its metrics comes back under "train_config_extra".
Fit = Callable[..., dict]


@dataclass(frozen=True)
class Trainer:
    """A trainer as the pipeline and the tools see it (`flywheel.training.TRAINERS`)."""

    name: str                        # train.trainer's value, the ledger's stage name and the model's kind
    section: str                     # its config section: cfg.<section>
    consumes: tuple[str, ...]        # the IterationState fields it trains on ("pairs", "prompts", "seeds", ...)
    stage: Callable[[StageContext, IterationState], StageResult]  # read rows, build the job, `train_stage`
    fit: Fit                         # train a loaded model on a job

    @property
    def trained_on(self) -> tuple[str, str]:
        """(stage, dataset) whose frozen version it reads, for lineage: ("pairs", "train"), ("seeds", "seeds"), ..."""
        return TRAINED_ON[self.consumes[0]]

    @property
    def needs_iteration_data(self) -> bool:
        """False for a trainer on the seeds alone (the plain-SFT baseline): no self-instruct, generate, judge, pairs."""
        return self.consumes != ("seeds",)


# IterationState field -> (the stage that makes it, the dataset a trainer reads from it)
TRAINED_ON = {"pairs": ("pairs", "train"), "prompts": ("self_instruct", "prompts"), "seeds": ("seeds", "seeds"),
              "judgments": ("judge", "judgments")}
