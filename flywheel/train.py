"""Training steps, each a thin call into TRL: causal-LM pretraining and SFT (SFTTrainer), DPO (DPOTrainer).

The functions take a loaded model and plain Python rows, train in place, and return the final metrics. They know
nothing of the registry; the stages in `bootstrap.py` and `dpo.py` decide what to train on and where it is saved.
On CPU we turn off what TRL defaults to for GPUs (bf16, gradient checkpointing): both fail or crawl there.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any

import datasets
import transformers
from datasets import Dataset
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer, SFTConfig, SFTTrainer

from . import timing

# Keep the trainers' own step progress bar; silence per-map bars, load/save bars and a deprecation TRL triggers.
datasets.disable_progress_bars()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
logging.getLogger("trl").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _StepBar(ProgressCallback):
    """The trainers' step progress bar, without printing every log dict under it (the metrics are returned)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def _quiet(trainer):
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(_StepBar)
    return trainer


def _hardware_args(device: str) -> dict[str, Any]:
    on_gpu = device == "cuda"
    return dict(use_cpu=not on_gpu, bf16=on_gpu, gradient_checkpointing=False)


def _common_args(device: str, seed: int, out_dir: str) -> dict[str, Any]:
    return dict(
        output_dir=out_dir,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=False,  # our logger level would turn the bar off and print raw log dicts instead
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        **_hardware_args(device),
    )


def _timed_train(trainer):
    with timing.compute():
        return trainer.train()


def _final_metrics(trainer, train_output) -> dict[str, float]:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    metrics = {"train_loss": float(train_output.training_loss), "steps": int(trainer.state.global_step)}
    if logs:
        metrics["final_loss"] = float(logs[-1]["loss"])
        for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
            if key in logs[-1]:
                metrics[key.replace("/", "_")] = float(logs[-1][key])
    return metrics


def causal_lm_train(model, tokenizer, texts: list[str], *, steps: int, lr: float, batch_size: int, max_length: int,
                    device: str, seed: int) -> dict[str, float]:
    """Plain next-token training on unlabelled text (how the tiny base model is made)."""
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            max_steps=steps, learning_rate=lr, per_device_train_batch_size=batch_size, max_length=max_length,
            lr_scheduler_type="cosine", warmup_steps=0.1, dataset_text_field="text",
            **_common_args(device, seed, out),
        )
        trainer = _quiet(SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                                    processing_class=tokenizer))
        return _final_metrics(trainer, _timed_train(trainer))


def sft_train(model, tokenizer, examples: list[dict], *, epochs: float, lr: float, batch_size: int, max_length: int,
              device: str, seed: int) -> dict[str, float]:
    """SFT on {"prompt", "completion"} rows, as chat turns; the loss covers the completion only."""
    rows = {
        "prompt": [[{"role": "user", "content": e["prompt"]}] for e in examples],
        "completion": [[{"role": "assistant", "content": e["completion"]}] for e in examples],
    }
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch_size, max_length=max_length,
            lr_scheduler_type="cosine", warmup_steps=0.05, **_common_args(device, seed, out),
        )
        trainer = _quiet(SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                    processing_class=tokenizer))
        return _final_metrics(trainer, _timed_train(trainer))


def dpo_train(model, tokenizer, pairs: list[dict], *, beta: float, lr: float, epochs: float, batch_size: int,
              max_length: int, device: str, seed: int) -> dict[str, float]:
    """DPO on {"prompt", "chosen", "rejected"} rows (plain strings), against a frozen copy of the model as reference.
    The learning rate decays by cosine to a tenth of its start (paper: 1e-6 -> 1e-7)."""
    rows = {
        "prompt": [[{"role": "user", "content": p["prompt"]}] for p in pairs],
        "chosen": [[{"role": "assistant", "content": p["chosen"]}] for p in pairs],
        "rejected": [[{"role": "assistant", "content": p["rejected"]}] for p in pairs],
    }
    with tempfile.TemporaryDirectory() as out:
        args = TRLDPOConfig(
            beta=beta, learning_rate=lr, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            max_length=max_length, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            **_common_args(device, seed, out),
        )
        trainer = _quiet(DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_dict(rows),
                                    processing_class=tokenizer))
        return _final_metrics(trainer, _timed_train(trainer))

