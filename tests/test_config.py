import subprocess
import sys

import pytest

from flywheel.config import ConfigError, FlywheelConfig, apply_override, load_config


def test_demo_config_loads_and_overrides_apply():
    cfg = load_config("configs/demo.yaml", ["generate.n=8", "judge.temperature=0.5", "run.name=other"])
    assert cfg.generate.n == 8
    assert cfg.judge.temperature == 0.5
    assert cfg.run.name == "other"
    assert cfg.model.tiny.hidden_size == 128  # from the file


def test_defaults_are_the_papers_numbers():
    cfg = FlywheelConfig()
    assert (cfg.generate.n, cfg.generate.temperature, cfg.generate.top_p) == (4, 0.7, 0.9)
    assert (cfg.self_instruct.few_shot, cfg.self_instruct.temperature) == (8, 0.6)
    assert cfg.judge.samples == 3
    assert (cfg.dpo.beta, cfg.dpo.learning_rate, cfg.dpo.batch_size) == (0.1, 1e-6, 16)


@pytest.mark.parametrize(
    "overrides, field, words",
    [
        (["generate.nn=3"], "generate.nn", "unknown key"),
        (["generate.n=many"], "generate.n", "valid integer"),
        (["generate.n=1"], "generate.n", "greater than or equal to 2"),
        (["judge.top_p=1.5"], "judge.top_p", "less than or equal to 1"),
        (["nosuchsection.x=1"], "nosuchsection", "unknown key"),
        (["run.device=tpu"], "run.device", "'auto', 'cpu' or 'cuda'"),
        (["model.tiny.hidden_size=130", "model.tiny.num_heads=4"], "model.tiny", "divisible"),
    ],
)
def test_bad_values_name_the_field(overrides, field, words):
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", overrides)
    msg = str(e.value)
    assert f"  {field}" in msg and words in msg


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["generate.n=x", "judge.samples=0"])
    assert "generate.n" in str(e.value) and "judge.samples" in str(e.value)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "generate.n")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"run": {"name": "x"}}, "run.name.first=1")


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


@pytest.mark.slow  # a real `flywheel run` in a subprocess
def test_cli_reports_a_bad_config_without_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "run", "--config", "configs/demo.yaml", "generate.n=abc",
         f"registry.root={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "generate.n" in text and "Traceback" not in text
    assert not (tmp_path / "flywheel.duckdb").exists()  # the run did not start


@pytest.mark.slow  # a real `flywheel run` in a subprocess
def test_cli_reports_a_bad_seed_file(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "no response"}\n')
    out = subprocess.run(
        [sys.executable, "-m", "flywheel.cli", "run", f"seeds.path={seeds}", f"registry.root={tmp_path / 'reg'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert f"{seeds}:2" in out.stdout and "'response'" in out.stdout and "Traceback" not in out.stdout
