"""`accelerate launch` commands (dry runs: built, not run), the DeepSpeed configs, and train_entry's errors.

The real child-process training run is in tests/test_trainers.py (test_accelerate_mode_trains_in_a_child_process).
"""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flywheel.config import ConfigError, load_config
from flywheel.training.launch import accelerate_command, deepspeed_stage

DS = Path("configs/deepspeed")
ARGS = ["--config", "job/config.json", "--job", "job"]


def _cfg(*overrides):
    return load_config(None, ["train.launch.mode=accelerate", *overrides])


def test_eight_gpu_zero3_command_dry_run():
    cfg = _cfg("run.device=cuda", "train.launch.num_processes=8", "train.launch.mixed_precision=bf16",
               "train.launch.deepspeed_config=configs/deepspeed/zero3.json")
    cmd = accelerate_command(cfg, "dpo", ARGS)
    print("\n" + " ".join(cmd))
    assert Path(cmd[0]).name == "accelerate"
    assert cmd[1:] == ["launch", "--num_processes", "8", "--num_machines", "1", "--mixed_precision", "bf16",
                       "--dynamo_backend", "no", "--use_deepspeed", "--deepspeed_config_file",
                       "configs/deepspeed/zero3.json", "-m", "flywheel.training.entry", "dpo", *ARGS]


def test_multi_gpu_without_deepspeed_and_cpu_commands():
    multi = accelerate_command(_cfg("run.device=cuda", "train.launch.num_processes=4"), "grpo", ARGS)
    assert "--multi_gpu" in multi and "--use_deepspeed" not in multi and "--cpu" not in multi
    single = accelerate_command(_cfg("run.device=cuda"), "grpo", ARGS)
    assert "--multi_gpu" not in single
    cpu = accelerate_command(_cfg("run.device=cpu"), "rs-sft", ARGS)
    assert "--cpu" in cpu and cpu[cpu.index("--num_cpu_threads_per_process") + 1] == str(torch.get_num_threads())
    assert cpu[cpu.index("-m"):] == ["-m", "flywheel.training.entry", "rs-sft", *ARGS]


def test_several_machines_take_rank_and_address_from_the_environment(monkeypatch):
    cfg = _cfg("run.device=cuda", "train.launch.num_processes=16", "train.launch.num_machines=2")
    monkeypatch.delenv("MACHINE_RANK", raising=False)
    monkeypatch.delenv("MAIN_PROCESS_IP", raising=False)
    with pytest.raises(ConfigError, match="MACHINE_RANK and MAIN_PROCESS_IP"):
        accelerate_command(cfg, "dpo", ARGS)
    monkeypatch.setenv("MACHINE_RANK", "1")
    monkeypatch.setenv("MAIN_PROCESS_IP", "10.0.0.1")
    cmd = accelerate_command(cfg, "dpo", ARGS)
    assert cmd[cmd.index("--machine_rank") + 1] == "1" and cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.1"
    assert cmd[cmd.index("--num_machines") + 1] == "2" and "--deepspeed_multinode_launcher" not in cmd
    cfg.train.launch.deepspeed_config = DS / "zero3.json"
    cmd = accelerate_command(cfg, "grpo", ARGS)
    assert cmd[cmd.index("--deepspeed_multinode_launcher") + 1] == "standard"


def test_bad_launch_settings_are_refused_with_the_field(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed_config: file not found"):
        accelerate_command(_cfg("run.device=cuda", f"train.launch.deepspeed_config={tmp_path}/nope.json"), "dpo", ARGS)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        accelerate_command(_cfg("run.device=cuda", f"train.launch.deepspeed_config={bad}"), "dpo", ARGS)
    with pytest.raises(ConfigError, match="run.device is cpu"):
        accelerate_command(_cfg("run.device=cpu", f"train.launch.deepspeed_config={DS}/zero2.json"), "dpo", ARGS)
    with pytest.raises(ConfigError, match="ZeRO-2"):
        accelerate_command(_cfg("run.device=cuda", "dpo.lora.enabled=true",
                                f"train.launch.deepspeed_config={DS}/zero3.json"), "dpo", ARGS)
    assert "--use_deepspeed" in accelerate_command(_cfg("run.device=cuda", "dpo.lora.enabled=true",
                                                        f"train.launch.deepspeed_config={DS}/zero2.json"), "dpo", ARGS)


def _auto_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _auto_keys(value, f"{prefix}{key}.")
        elif value == "auto":
            yield f"{prefix}{key}"


def test_deepspeed_configs_are_zero2_and_zero3_with_values_the_trainer_fills():
    """Every "auto" is one the HF Trainer fills in (transformers.integrations.deepspeed names each such key), and
    ZeRO-3 gathers the full weights when saving, which saving M_{t+1} as a plain model needs."""
    from transformers.integrations import deepspeed as hf_ds

    filled_by_trainer = inspect.getsource(hf_ds)
    for name, stage in (("zero2.json", 2), ("zero3.json", 3)):
        data = json.loads((DS / name).read_text())
        assert deepspeed_stage(DS / name) == stage
        autos = list(_auto_keys(data))
        assert {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "bf16.enabled"} <= set(autos)
        assert all(f'"{key}"' in filled_by_trainer for key in autos), autos
    assert json.loads((DS / "zero3.json").read_text())["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


@pytest.mark.slow  # two training-entry subprocesses
def test_train_entry_refuses_a_bad_job_folder(tmp_path):
    """A real `python -m flywheel.training.entry` subprocess: a missing job folder is a one-line error and status 2."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(load_config(None, []).model_dump(mode="json")))
    run = subprocess.run([sys.executable, "-m", "flywheel.training.entry", "dpo", "--config", str(config),
                          "--job", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "has no job.json" in run.stderr and "Traceback" not in run.stderr
    config.write_text("run: {iterations: zero}")
    run = subprocess.run([sys.executable, "-m", "flywheel.training.entry", "dpo", "--config", str(config),
                          "--job", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "run.iterations" in run.stderr
