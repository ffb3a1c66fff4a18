"""Training in its own process, started with `accelerate launch`, so its GPU memory is all freed when it ends.

With `train.launch.mode: accelerate`, a trainer stage (see `flywheel.training.job.train_stage`) writes its job to a folder
(`<registry>/jobs/<stage run id>/`: the config, the training rows, the model paths), runs

    accelerate launch --num_processes 8 --num_machines 1 --mixed_precision bf16 \
        --use_deepspeed --deepspeed_config_file configs/deepspeed/zero3.json \
        -m flywheel.training.entry dpo --config <job>/config.json --job <job>

and waits. Every process trains (TRL and accelerate split the batches); the main one saves M_{t+1} and writes
`<job>/metrics.json`; the parent registers the model and removes the folder (kept when the child fails). The child
never opens the registry. `accelerate_command(cfg, stage, args)` builds the command without running it (a dry run):

    flywheel.training.launch.accelerate_command(cfg, "dpo", ["--config", "c.json", "--job", "j"])

Settings (`train.launch`): num_processes (in all, over all machines), num_machines, mixed_precision, deepspeed_config
(a ZeRO JSON: configs/deepspeed/zero2.json or zero3.json, whose "auto" values the HF Trainer fills in). Without
DeepSpeed and with several processes the command says --multi_gpu; with `run.device: cpu` it says --cpu and gives
the child as many threads as this process uses (torch.get_num_threads(), i.e. OMP_NUM_THREADS when set). On several
machines each one runs the stage with MACHINE_RANK, MAIN_PROCESS_IP (and optionally MAIN_PROCESS_PORT) set.
DeepSpeed itself is not in the CPU install: `pip install deepspeed` on the GPU machines.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .. import timing
from ..config import ConfigError, FlywheelConfig
from .job import TrainJob

log = logging.getLogger("flywheel")

ENTRY_MODULE = "flywheel.training.entry"
_PACKAGE_PARENT = Path(__file__).resolve().parents[2]


class TrainProcessError(RuntimeError):
    """The training child process failed; the message names the command and the kept job folder."""


def deepspeed_stage(path: str | Path) -> int:
    """The ZeRO stage of a DeepSpeed JSON config, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.launch.deepspeed_config: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.launch.deepspeed_config: {path} is not valid JSON "
                          f"(line {e.lineno}: {e.msg})") from None
    stage = data.get("zero_optimization", {}).get("stage") if isinstance(data, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.launch.deepspeed_config: {path} has no zero_optimization.stage of 0-3")
    return stage


def _accelerate_executable() -> str:
    beside = Path(sys.executable).with_name("accelerate")  # the one in this interpreter's environment
    return str(beside) if beside.exists() else "accelerate"


def accelerate_command(cfg: FlywheelConfig, stage: str, args: list[str]) -> list[str]:
    """The `accelerate launch ... -m flywheel.training.entry <stage> <args>` command for `cfg.train.launch`."""
    launch = cfg.train.launch
    cmd = [_accelerate_executable(), "launch", "--num_processes", str(launch.num_processes),
           "--num_machines", str(launch.num_machines), "--mixed_precision", launch.mixed_precision,
           "--dynamo_backend", "no"]
    if cfg.run.device == "cpu":
        if launch.deepspeed_config:
            raise ConfigError("train.launch.deepspeed_config is set but run.device is cpu; DeepSpeed needs GPUs")
        import torch

        # accelerate would pick 2 threads; this process's own setting is what the user (or a shared machine) wants
        cmd += ["--cpu", "--num_cpu_threads_per_process", str(torch.get_num_threads())]
    if launch.deepspeed_config:
        zero = deepspeed_stage(launch.deepspeed_config)
        if stage == "dpo" and cfg.dpo.lora.on("cuda", cfg.scratch) and zero == 3:
            raise ConfigError("dpo.lora.enabled with a ZeRO-3 train.launch.deepspeed_config: the adapters are merged "
                              "on one process before saving, which needs whole weights; use ZeRO-2 (zero2.json)")
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(launch.deepspeed_config)]
    elif launch.num_processes > 1 and cfg.run.device != "cpu":
        cmd.append("--multi_gpu")
    if launch.num_machines > 1:
        missing = [v for v in ("MACHINE_RANK", "MAIN_PROCESS_IP") if not os.environ.get(v)]
        if missing:
            raise ConfigError(f"train.launch.num_machines is {launch.num_machines}: set {' and '.join(missing)} "
                              "in the environment of each machine")
        cmd += ["--machine_rank", os.environ["MACHINE_RANK"], "--main_process_ip", os.environ["MAIN_PROCESS_IP"],
                "--main_process_port", os.environ.get("MAIN_PROCESS_PORT", "29500")]
        if launch.deepspeed_config:  # each machine starts its own processes, as without DeepSpeed (no pdsh)
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    return [*cmd, "-m", ENTRY_MODULE, stage, *args]


def run_accelerate(cfg: FlywheelConfig, job: TrainJob, folder: Path) -> dict:
    """Write `job` and the config to `folder`, train in an `accelerate launch` child, return the metrics it wrote.
    The folder is removed on success and kept (for a look) on failure."""
    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    job.write(folder)
    config_path = folder / "config.json"
    config_path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    cmd = accelerate_command(cfg, job.trainer, ["--config", str(config_path), "--job", str(folder)])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_PARENT), env.get("PYTHONPATH")) if p)
    log.info("training in a child process: %s", shlex.join(cmd))
    with timing.compute():
        rc = subprocess.run(cmd, env=env).returncode
    metrics_path = folder / "metrics.json"
    if rc != 0 or not metrics_path.is_file():
        raise TrainProcessError(f"{job.trainer} training process exited with status {rc} (its output is above); "
                                f"command: {shlex.join(cmd)}; job kept in {folder}")
    metrics = json.loads(metrics_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    return metrics
