"""`train.report_to`: each iteration's report figures and the trainers' own metrics in the user's tracker
(flywheel/tracking.py). A real tiny run into TensorBoard, read back; a tracker whose package is missing is refused
before any work; `none` writes nothing; a tracker that fails while logging only warns."""

import importlib.util
import logging
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flywheel import tracking
from flywheel.analysis import report
from flywheel.cli import main as cli_main
from flywheel.config import ConfigError, load_config
from flywheel.pipeline import preflight
from flywheel.registry import Registry
from tests.helpers.models import tiny_overrides
from tests.helpers.registry import HEALTHY, build_run


def scalars(folder) -> dict[str, list]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def tiny_tracked_run(tmp_path_factory, one_torch_thread):
    """A tiny real run (seeds -> PT -> M1 -> one DPO iteration) with train.report_to=tensorboard."""
    from flywheel import pipeline

    folder = tmp_path_factory.mktemp("tracked")
    cfg = load_config(None, [*tiny_overrides(folder, folder / "registry"), "train.report_to=tensorboard"])
    preflight(cfg)
    return cfg, pipeline.run(cfg)


@pytest.mark.slow
def test_each_iteration_s_report_figures_and_the_trainers_metrics_are_in_tensorboard(tiny_tracked_run):
    cfg, run_id = tiny_tracked_run
    with Registry(cfg.registry.root) as reg:
        [it] = report.collect(reg, run_id)
        models = reg.rows("SELECT model_in, model_out FROM iterations WHERE run_id = ?", [run_id])[0]
    logged = scalars(cfg.registry.root / "tracking" / run_id)
    for key in tracking.FIGURES:  # each figure the report has, at step 1; those it has not (None) are absent
        if it[key] is None:
            assert f"report/{key}" not in logged, key
        else:
            [event] = logged[f"report/{key}"]
            assert event.step == 1 and event.value == pytest.approx(it[key]), key
    assert {"report/pairs", "report/parse_failures", "report/mean_tokens", "report/train_loss"} <= set(logged)
    assert logged["training/steps"][0].value == it["training"]["steps"]
    assert logged["monitors/fired"][0].step == 1
    events = EventAccumulator(str(cfg.registry.root / "tracking" / run_id))
    events.Reload()
    tags = events.Tensors("tags/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"run_id: {run_id}" in tags and models["model_in"] in tags and models["model_out"] in tags
    # the trainers' own scalars (transformers' TensorBoardCallback), one folder per training stage
    for stage in ("M1-sft", "M2-dpo"):
        trained = scalars(cfg.registry.root / "tracking" / run_id / stage)
        assert trained["train/loss"] and trained["train/learning_rate"], stage
    assert "train/rewards/margins" in scalars(cfg.registry.root / "tracking" / run_id / "M2-dpo")


def test_report_to_does_not_change_the_run_id(tmp_path):
    from flywheel.registry.runs import run_id_for

    base = [f"registry.root={tmp_path}"]
    assert run_id_for(load_config(None, base)) == run_id_for(load_config(None, [*base, "train.report_to=tensorboard"]))


@pytest.fixture
def no_wandb(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))


def test_a_tracker_whose_package_is_missing_is_refused_before_any_work(tmp_path, no_wandb, capsys):
    with pytest.raises(ConfigError, match=r"train.report_to: 'wandb' needs the 'wandb' package.*pip install wandb"):
        tracking.check("wandb")
    root = tmp_path / "reg"
    rc = cli_main(["run", "--config", "tests/small.yaml", f"registry.root={root}", "train.report_to=wandb"])
    out = capsys.readouterr()
    assert rc != 0 and "train.report_to" in out.out + out.err and "pip install wandb" in out.out + out.err
    assert not (root / "models").exists() and not (root / "tracking").exists()
    tracking.check("none")
    tracking.check("tensorboard")  # a dependency of flywheel


def test_each_iteration_is_one_step_of_the_report_s_figures(tmp_path):
    root = tmp_path / "reg"
    run_id = build_run(root, [HEALTHY, dict(HEALTHY, loss=0.4)])
    cfg = load_config(None, [f"registry.root={root}", "train.report_to=tensorboard"])
    with Registry(root) as reg:
        for t in (1, 2):
            tracking.log_iteration(reg, cfg, run_id, t)
        iterations = report.collect(reg, run_id)
    logged = scalars(root / "tracking" / run_id)
    for key in ("pairs", "mean_score", "parse_failure_rate", "judge_samples", "candidates", "train_loss"):
        assert [(e.step, e.value) for e in logged[f"report/{key}"]] == \
            [(it["iteration"], pytest.approx(it[key])) for it in iterations], key
    assert "report/agreement" not in logged  # no coherent reward: the figure is absent, not 0
    assert [e.step for e in logged["monitors/fired"]] == [1, 2]


def test_none_writes_nothing_and_a_failing_tracker_only_warns(tmp_path, monkeypatch, caplog):
    root = tmp_path / "reg"
    run_id = build_run(root, [HEALTHY])
    with Registry(root) as reg:
        tracking.log_iteration(reg, load_config(None, [f"registry.root={root}"]), run_id, 1)
        assert not (root / "tracking").exists()

        def broken(*args):
            raise OSError("tracker unreachable")

        monkeypatch.setitem(tracking.WRITERS, "tensorboard", broken)
        cfg = load_config(None, [f"registry.root={root}", "train.report_to=tensorboard"])
        with caplog.at_level(logging.WARNING, logger="flywheel"):
            tracking.log_iteration(reg, cfg, run_id, 1)  # no exception
    assert "train.report_to=tensorboard: iteration 1's figures were not logged (OSError: tracker unreachable)" \
        in caplog.text


@pytest.mark.parametrize("name", ["mlflow", "wandb", "trackio"])
def test_the_other_trackers_get_the_figures_at_the_iteration_s_step(name, cfg, monkeypatch):
    """Not installed here: a stand-in module records the calls (mlflow's through its fluent API, wandb's on its run)."""
    from unittest.mock import MagicMock

    module = MagicMock()
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    scalars_ = {"report/pairs": 9.0}
    tracking.WRITERS[name](cfg, "run-a", 2, scalars_, {"run_id": "run-a"})
    logger = module.init.return_value if name == "wandb" else module
    (logger.log_metrics if name == "mlflow" else logger.log).assert_called_once_with(scalars_, step=2)
    if name == "mlflow":
        module.set_tracking_uri.assert_called_once_with(f"sqlite:///{cfg.registry.root.resolve()}/tracking/mlflow.db")
