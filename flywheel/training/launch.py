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

Mode ray (`train.launch.mode: ray`, `run_ray`): the same job folder, trained as a Ray Train job. The stage connects
to the cluster (`ray.address`, else RAY_ADDRESS, else a local cluster started in this process and shut down after)
and runs a `TorchTrainer` of `train.launch.num_processes` workers, each reserving `ray.cpus_per_worker` CPUs (its
torch threads) and, on GPUs (`run.device: cuda`, or `auto` on a cluster that has GPUs), one GPU. Ray Train opens
the process group (gloo on CPU, nccl on GPUs) and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in each
worker, so accelerate, transformers and TRL see a data-parallel run as under `accelerate launch`: each worker gets
1/num_processes of the batches (`dpo.batch_size` and the like are per process, as in mode accelerate). Every worker
runs what the accelerate child runs (`flywheel.training.entry.train_folder`: `run_job` with the trainer's fit); rank
0 saves M_{t+1} to the job's out_dir and writes `<job>/metrics.json` (with "world_size"). Ray's own run state goes to
`<job>/ray/`. The parent reads the metrics, registers the model and removes the folder; when the job fails the folder
is kept and TrainProcessError names it. Workers read the job and write the model by path: on one machine that is
the same disk; on several nodes the registry (`registry.root`) must be on storage every node mounts at the same
path. Not supported in mode ray (refused before any work): train.launch.deepspeed_config and num_machines > 1 (Ray
places the workers itself). Needs `pip install -e ".[ray]"`.
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


RAY_WORKER_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "TOKENIZERS_", "WANDB_", "MLFLOW_", "TRACKIO_")


def check_ray_launch(cfg: FlywheelConfig) -> None:
    """Refuse, before any work, what mode ray does not do; a ConfigError names the field."""
    launch = cfg.train.launch
    if launch.deepspeed_config:
        raise ConfigError("train.launch.deepspeed_config is set but train.launch.mode is ray; DeepSpeed runs under "
                          "mode accelerate (`accelerate launch --use_deepspeed`): unset it or use mode accelerate")
    if launch.num_machines > 1:
        raise ConfigError(f"train.launch.num_machines is {launch.num_machines} but train.launch.mode is ray, where Ray "
                          "places the train.launch.num_processes workers on the cluster's nodes: leave it at 1")


def _import_ray():
    try:
        import ray
        import ray.train.torch  # Ray Train: `ray[train]`
    except ImportError as e:
        raise ConfigError(f"train.launch.mode is ray but Ray Train is not installed ({e}): "
                          'pip install -e ".[ray]"') from None
    return ray


def _ray_connect(cfg: FlywheelConfig, ray) -> bool:
    """Join `ray.address`, else RAY_ADDRESS, else start a local cluster; True when this call connected (so the caller
    disconnects), False when this process was already connected."""
    from ..backends.ray_data import cluster_address, probe  # the one rule for which cluster, as generation's

    if ray.is_initialized():
        return False
    address, setting = cluster_address(cfg.ray)
    if address:
        probe(address, setting)  # a dead address is a ConfigError in seconds, not ray.init's long retries
    ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=True)
    if address is None:  # a cluster of this machine alone: it cannot grow, so say now if the workers cannot fit
        launch, have = cfg.train.launch, ray.cluster_resources().get("CPU", 0)
        need = launch.num_processes * cfg.ray.cpus_per_worker
        if need > have:
            ray.shutdown()
            raise ConfigError(f"train.launch.num_processes ({launch.num_processes}) x ray.cpus_per_worker "
                              f"({cfg.ray.cpus_per_worker}) = {need:g} CPUs, but the local Ray cluster has {have:g}: "
                              "lower one, or set ray.address to a larger cluster")
    return True


def _ray_use_gpu(cfg: FlywheelConfig, ray) -> bool:
    if cfg.run.device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.run.device != "cpu"


def _ray_train_worker(spec: dict) -> None:
    """One Ray Train worker: read the job folder and train it as the accelerate child does (entry.train_folder).
    Ray Train has opened the process group and set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT."""
    os.environ.update(spec["env"])
    _unpatch_print()
    import torch

    torch.set_num_threads(spec["threads"])
    from ..config import load_config
    from . import TRAINERS
    from .entry import train_folder

    folder = Path(spec["job"])
    cfg = load_config(spec["config"])
    job = TrainJob.read(folder)
    train_folder(cfg, job, TRAINERS[job.trainer].fit, folder)


def _unpatch_print() -> None:
    """Python's own print back in a Ray Train worker. Ray Train routes every print to its log, even one a library
    captures: `datasets` hashing TRL's map functions through dill (which reads globals from a captured `dis.dis`)
    then floods the log with thousands of lines of bytecode."""
    try:
        from ray.train.v2._internal.logging import patch_print
    except ImportError:  # another Ray: its print is its own business
        return
    import builtins

    builtins.print = patch_print._original_print


def run_ray(cfg: FlywheelConfig, job: TrainJob, folder: Path) -> dict:
    """Write `job` and the config to `folder`, train it as a Ray Train job of `train.launch.num_processes` workers,
    return the metrics rank 0 wrote. The folder is removed on success and kept (for a look) on failure."""
    check_ray_launch(cfg)
    ray = _import_ray()
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from ..backends.ray_data import cluster_address
    from ray.train.torch import TorchTrainer

    folder = Path(folder).resolve()
    launch, threads = cfg.train.launch, max(1, int(cfg.ray.cpus_per_worker))
    env = {k: v for k, v in os.environ.items() if k.startswith(RAY_WORKER_ENV_PREFIXES)}
    env["OMP_NUM_THREADS"] = str(threads)  # accelerate reads it (unset, it picks its own thread count)
    if launch.mixed_precision != "no":  # what `accelerate launch --mixed_precision` passes its processes
        env["ACCELERATE_MIXED_PRECISION"] = launch.mixed_precision
    connected = _ray_connect(cfg, ray)  # before the folder: a local cluster too small is refused with nothing written
    try:
        shutil.rmtree(folder, ignore_errors=True)
        job.write(folder)
        config_path = folder / "config.json"
        config_path.write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
        use_gpu = _ray_use_gpu(cfg, ray)
        resources = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        trainer = TorchTrainer(
            _ray_train_worker,
            train_loop_config={"config": str(config_path), "job": str(folder), "threads": threads, "env": env},
            scaling_config=ScalingConfig(num_workers=launch.num_processes, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(storage_path=str(folder / "ray"), name=f"{job.trainer}-{folder.name}",
                                 failure_config=FailureConfig(max_failures=0)))
        where = cluster_address(cfg.ray)[0] or "a local Ray cluster"
        log.info("training as a Ray Train job on %s: %d %s workers; job %s", where, launch.num_processes,
                 "GPU" if use_gpu else "CPU", folder)
        with timing.compute():
            try:
                trainer.fit()
                error = None
            except Exception as e:  # noqa: BLE001  (TrainingFailedError, or Ray itself failing): reported below
                error = e
    finally:
        if connected:
            ray.shutdown()
    metrics_path = folder / "metrics.json"
    if error is not None or not metrics_path.is_file():
        why = f"failed: {type(error).__name__}: {str(error).strip()[-2000:]}" if error else "wrote no metrics.json"
        raise TrainProcessError(f"{job.trainer} training as a Ray Train job ({launch.num_processes} workers) {why}; "
                                f"job kept in {folder}") from error
    metrics = json.loads(metrics_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    return metrics
