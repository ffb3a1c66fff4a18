"""The experiment's worlds (flywheel/analysis/tasks.py): the ground truth each gives, checked against its own files, and
an `ifworld` experiment end to end on the tiny scratch model (plumbing: IFEval grading, judge items, pair accuracy
by the checkers). The real model's run is `flywheel experiment ifworld` (README figures), too slow for CI."""

import json

import pytest

from flywheel.analysis import miniworld as mw
from flywheel.analysis.experiment import load_experiment, pair_quality, run_experiment, summarise, write_results
from flywheel.analysis.tasks import IFTask, SortTask
from flywheel.config import ConfigError
from flywheel.registry import Registry

IFWORLD = "configs/experiments/ifworld.yaml"


@pytest.fixture(scope="module")
def ifworld(tmp_path_factory):
    from flywheel.analysis.ifworld import IFWorldSizes

    task = IFTask(IFWorldSizes(seeds=4, pool=6, test=8))
    files = task.write(0, tmp_path_factory.mktemp("ifworld"))
    return task, files, task.test_set(files)


def test_ifworld_grades_its_own_proofs_right_and_its_near_misses_wrong(ifworld):
    task, files, test = ifworld
    items = task.judge_items(0, files, test, len(test))
    assert len(items) >= len(test) - 1  # a one-instruction prompt whose plain answer follows it has no wrong reply
    for prompt, right, wrong, reference in items:
        assert task.value(prompt, right, reference) == 1.0 > task.value(prompt, wrong, reference)
    graded = task.grade([r for r in test if r["prompt"] in {i[0] for i in items}], [i[1] for i in items])
    assert graded["accuracy"] == graded["instruction_accuracy"] == 1.0 and all(graded["correct"])
    wrong = task.grade([r for r in test if r["prompt"] in {i[0] for i in items}], [i[2] for i in items])
    assert wrong["accuracy"] == 0.0 and 0 <= wrong["instruction_accuracy"] < 1 and not any(wrong["correct"])


def test_the_test_references_are_the_instructions_of_the_ifeval_file(ifworld):
    task, files, test = ifworld
    raw = [json.loads(line) for line in files["test"].read_text().splitlines()]
    for r, row in zip(raw, test):
        ref = json.loads(row["reference"])
        assert ref == {"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]}


def test_sort_values_are_exact_match(tmp_path):
    task = SortTask(mw.WorldSizes(min_len=2, max_len=3, corpus_docs=4, lines_per_doc=2, seeds=2, pool=2, test=4))
    files = task.write(0, tmp_path)
    test = task.test_set(files)
    items = task.judge_items(0, files, test, 3)
    assert [task.value(p, right, ref) for p, right, _, ref in items] == [1.0] * 3
    assert [task.value(p, wrong, ref) for p, _, wrong, ref in items] == [0.0] * 3
    assert task.grade(test, [r["reference"] for r in test])["accuracy"] == 1.0


@pytest.mark.parametrize("override, message", [
    ("task=chess", "unknown task 'chess'"),
    ("world={min_instructions: 3, max_instructions: 2}", "above max_instructions"),
    ("world.max_instructions=0", "world.max_instructions"),
    ("world.min_len=3", "world.min_len"),               # a sort field in an ifworld world
])
def test_a_world_is_checked_against_its_task(override, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(IFWORLD, [override])


def test_pair_accuracy_counts_more_instructions_followed_as_right(tmp_path, ifworld):
    """`pair_quality` with the ifworld task: a pair is right when its chosen reply follows more of the prompt's
    instructions than its rejected one (fraction_followed), read from the registry's pairs of a run."""
    from flywheel.registry import now

    task, files, test = ifworld
    items = task.judge_items(0, files, test, 3)
    with Registry(tmp_path) as reg:
        common = dict(run_id="r", iteration=1, config_hash="h", created_at=now())
        reg.insert("run_stages", [dict(run_id="r", iteration=1, stage="pairs", stage_run_id="ps")])
        for k, (prompt, right, wrong, ref) in enumerate(items):
            reg.insert("prompts", [dict(prompt_id=f"p{k}", source="file", text=prompt, reference=ref, seed_id=None,
                                        few_shot_ids=None, kept=True, drop_reason=None, model_id=None,
                                        stage_run_id="si", **common)])
            reg.insert("candidates", [dict(candidate_id=f"c{k}-{j}", prompt_id=f"p{k}", sample_index=j, text=t,
                                           num_tokens=len(t), finish_reason="stop", model_id="m", backend="b",
                                           sampling={}, seed=0, stage_run_id="g", **common)
                                      for j, t in enumerate((right, wrong))])
            chosen, rejected = (0, 1) if k else (1, 0)  # the first pair the wrong way round
            reg.insert("pairs", [dict(pair_id=f"pr{k}", prompt_id=f"p{k}", chosen_id=f"c{k}-{chosen}",
                                      rejected_id=f"c{k}-{rejected}", chosen_score=1.0, rejected_score=0.0,
                                      signals={}, stage_run_id="ps", **common)])
        q = pair_quality(reg, "r", 1, task)
    assert q["pairs"] == len(items) and q["pair_accuracy"] == pytest.approx((len(items) - 1) / len(items))
    assert q["pair_inverted"] == pytest.approx(1 / len(items))


@pytest.mark.slow
def test_an_ifworld_experiment_runs_on_the_tiny_model(tmp_path, one_torch_thread):
    """Every figure of an ifworld experiment, on a scratch model that follows no instruction: the plumbing, and what
    must hold whatever the model does (the oracle's pairs, when it finds any, are right by the checkers)."""
    exp = load_experiment(IFWORLD, [
        "world={seeds: 6, pool: 12, test: 6}", "eval={judge_problems: 3, max_new_tokens: 8, batch_size: 8}",
        "config.run={iterations: 1, device: cpu}", "config.model={base: tiny, tiny: {vocab_size: 320, hidden_size: 32, "
        "intermediate_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1, max_position: 2048, pretrain_steps: 10, "
        "pretrain_batch_size: 4}}",
        "config.sft={epochs: 1, learning_rate: 3.0e-3, batch_size: 8, max_length: 1024}",
        "config.self_instruct={num_prompts: 4}", "config.generate={n: 3, temperature: 1.0, max_new_tokens: 12}",
        "config.judge={mode: sample, samples: 1, max_new_tokens: 8, batch_size: 8}",
        "config.dpo={learning_rate: 1.0e-4, epochs: 1, batch_size: 2, max_length: 1024, dropout: 0.0}"])
    rows = run_experiment(exp, tmp_path, ["rule-oracle", "plain-sft"])
    write_results(exp, tmp_path, rows)
    by = {(r["variant"], r["model"]): r for r in rows}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["instruction_accuracy"] <= 1 and r["test_problems"] == 6
        assert r["judge_problems"] >= 2 and 0 <= r["judge_agreement"] <= 1
    assert by[("plain-sft", "M2")]["pairs"] == 0
    oracle = by.get(("rule-oracle", "M2"))
    if oracle is not None and oracle["pairs"]:
        assert oracle["pair_accuracy"] == 1.0  # the checkers' own pairs: chosen follows more than rejected
    md = (tmp_path / "experiments" / "ifworld" / "results.md").read_text()
    assert "IFEval prompt-level strict accuracy %" in md and "instruction-level %" in md
    assert {e["variant"] for e in summarise(rows)} == {"rule-oracle", "plain-sft"}
