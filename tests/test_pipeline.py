"""The pipeline's shape, without running a model: which steps an iteration has, what each reads and adds, and the
trainer table the config is checked against. (The pipeline runs for real in test_e2e, test_kill_resume and the
schedule tests.)"""

import pytest

from flywheel import pipeline
from flywheel.config import ConfigError, load_config
from flywheel.stage import IterationState, StageContext, StageResult, Step
from flywheel.training import TRAINERS


def names(cfg, iteration=1):
    return [s.name for s in pipeline.steps_for(cfg, iteration)]


def test_an_iteration_is_the_data_steps_then_its_trainer():
    assert names(load_config(None, [])) == ["self_instruct", "generate", "judge", "pairs", "dpo"]
    with_reward = load_config(None, ["reward.coherent=true", "reward.weights={judge: 1, coherent: 1}"])
    assert names(with_reward) == ["self_instruct", "generate", "judge", "reward", "pairs", "dpo"]
    no_judge = load_config(None, ["reward.coherent=true", "reward.weights={coherent: 1}"])
    assert names(no_judge) == ["self_instruct", "generate", "reward", "pairs", "dpo"]
    per_iteration = load_config(None, ["train.trainer=[dpo, sft, rs-sft]"])
    assert [names(per_iteration, t)[-1] for t in (1, 2, 3)] == ["dpo", "sft", "rs-sft"]
    assert names(per_iteration, 2) == ["sft"]  # the plain-SFT baseline reads the seeds alone: no data steps


def test_every_trainer_in_the_table_is_a_config_section_and_nothing_else_is():
    cfg = load_config(None, [])
    for name, trainer in TRAINERS.items():
        assert trainer.name == name and getattr(cfg, trainer.section) is not None
        assert set(trainer.consumes) <= set(IterationState.__dataclass_fields__)
    with pytest.raises(ConfigError, match=r"train\.trainer: unknown trainer\(s\) \['dpoo'\]; known: .*'rs-sft'"):
        load_config(None, ["train.trainer=dpoo"])
    with pytest.raises(ConfigError, match="unknown trainer"):
        load_config(None, ["train.trainer=seeds"])  # a config section, but not a trainer's


def test_a_step_adds_its_output_to_the_state_and_refuses_a_missing_input():
    cfg = load_config(None, [])
    ctx = StageContext(cfg, "run", 1)
    seen = []

    def run(c, s):
        seen.append((c.iteration, s.prompts))
        return StageResult("generate", "generate-abc")

    step = Step("generate", ("model", "prompts"), "candidates", run)
    result, state = step(ctx, IterationState(model="m", prompts="si-1"))
    assert seen == [(1, "si-1")] and state.candidates == "generate-abc" and state.prompts == "si-1"
    with pytest.raises(ValueError, match="stage generate .* needs prompts, which no earlier stage produced"):
        step(ctx, IterationState(model="m"))
    _, state = Step("dpo", ("model",), "model", lambda c, s: StageResult("dpo", "dpo-1", {"model_id": "dpo-1"}))(
        ctx, state)
    assert state.model == "dpo-1"


def test_the_next_iteration_starts_from_the_new_model_and_remembers_the_prompts():
    state = IterationState(seeds="s", pt="pt", m1="m1", model="m2", prompts="si-1", candidates="g", pairs="p")
    nxt = pipeline.next_state(state)
    assert (nxt.model, nxt.earlier_prompts, nxt.prompts, nxt.candidates, nxt.pairs) == ("m2", ("si-1",), None, None,
                                                                                         None)
    assert pipeline.next_state(pipeline.next_state(nxt)).earlier_prompts == ("si-1",)  # a baseline adds none
