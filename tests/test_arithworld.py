"""The arithmetic mini-world (flywheel/analysis/arithworld.py): its files, its checkers (exact match of the final
value, the step rule's first-error labels, step accuracy), its task (grading, judge items) and its column in the
experiment's table. All fast: no model runs."""

import random

import pytest

from flywheel.analysis import arithworld as aw
from flywheel.analysis.experiment import summarise, table
from flywheel.analysis.miniworld import read_jsonl
from flywheel.analysis.tasks import TASKS, ArithTask
from flywheel.stages.seeds import load_seed_data

SIZES = aw.ArithSizes(corpus_docs=60, lines_per_doc=4, seeds=30, pool=40, test=25)
PROMPT = "Compute 7+5-3+8."
CHAIN = ["7+5=12", "12-3=9", "9+8=17"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return aw.ArithWorld(SIZES, seed=3).write(tmp_path_factory.mktemp("arith"))


def _problems(path, key="prompt"):
    return {r[key] for r in read_jsonl(path)}


def test_splits_are_disjoint_and_the_corpus_never_holds_a_test_problem(world):
    test, pool = _problems(world["test"]), _problems(world["pool"])
    seeds = {r["prompt"]["text"] for r in read_jsonl(world["seeds"])}
    assert (len(test), len(seeds), len(pool)) == (25, 30, 40)
    assert not test & seeds and not test & pool and not seeds & pool
    docs = world["corpus"].read_text().strip().split("\n\n")
    assert len(docs) == SIZES.corpus_docs
    lines = [line for d in docs for line in d.splitlines()]
    asked = {line for line in lines if aw.parse_prompt(line)}
    assert asked and not asked & test
    assert all(aw._STEP.match(line) for line in lines if line not in asked)
    # nor is a bare chain of the corpus a test problem
    w = aw.ArithWorld(SIZES, seed=3)
    held_out = set(w.problems()["test"])
    chains = [p for doc in w.corpus_problems(held_out) for p, _ in doc]
    assert len(chains) == SIZES.corpus_docs * SIZES.lines_per_doc and not set(chains) & held_out
    assert {aw.prompt_of(p) for p in held_out} == test
    assert w.corpus(held_out) == docs
    seen = set(chains)  # a held-out set that the draws would hit: every one of them is drawn again
    assert not {p for doc in w.corpus_problems(seen) for p, _ in doc} & seen


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(world, tmp_path):
    again = aw.ArithWorld(SIZES, seed=3).write(tmp_path / "again")
    other = aw.ArithWorld(SIZES, seed=4).write(tmp_path / "other")
    for name in world:
        assert again[name].read_bytes() == world[name].read_bytes()
        assert other[name].read_bytes() != world[name].read_bytes()


def test_every_running_value_stays_in_bounds_and_every_file_is_right(world):
    rows = read_jsonl(world["test"]) + read_jsonl(world["pool"])
    for r in rows:
        start, ops = aw.parse_prompt(r["prompt"])
        vals = aw.values_of((start, ops))
        assert SIZES.min_ops <= len(ops) <= SIZES.max_ops and 0 <= start <= SIZES.max_operand
        assert all(1 <= b <= SIZES.max_operand for _, b in ops)
        assert all(0 <= v <= SIZES.max_value for v in vals)
        assert r["reference"] == str(vals[-1])
    for r in read_jsonl(world["test"]):
        assert aw.exact_match(r["prompt"], r["solution"], None) == 1.0
        assert aw.step_check(r["prompt"], r["reference"], r["solution"].splitlines()) == [1.0] * len(
            r["solution"].splitlines())
    small = aw.ArithWorld(aw.ArithSizes(max_operand=5, max_value=12, test=200, seeds=20, pool=20), seed=0)
    for p in sum(small.problems().values(), []):
        assert all(0 <= v <= 12 for v in aw.values_of(p))


def test_prompts_and_solutions_round_trip():
    assert aw.parse_prompt(PROMPT) == (7, [("+", 5), ("-", 3), ("+", 8)])
    problem = (7, (("+", 5), ("-", 3), ("+", 8)))
    assert aw.prompt_of(problem) == PROMPT
    assert aw.solution_of(problem) == "\n".join(CHAIN) and aw.reference_of(problem) == "17"
    assert aw.parse_prompt("Sort the digits 123.") is None and aw.parse_prompt("Compute 7.") is None


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="above max_ops"):
        aw.ArithSizes(min_ops=5, max_ops=3)
    with pytest.raises(ValueError, match="above max_value"):
        aw.ArithSizes(max_operand=20, max_value=10)
    with pytest.raises(ValueError, match="distinct problems"):
        aw.ArithWorld(aw.ArithSizes(min_ops=1, max_ops=1, max_operand=2, max_value=4, test=50), 0).problems()


def test_exact_match_reads_the_final_value():
    right = "\n".join(CHAIN)
    assert aw.exact_match(PROMPT, right, "17") == aw.exact_match(PROMPT, right, None) == 1.0
    assert aw.exact_match(PROMPT, right + "\n\n  ", None) == 1.0   # trailing blank lines
    assert aw.exact_match(PROMPT, "17", None) == 1.0                # a bare number
    assert aw.exact_match(PROMPT, "7+5=12\n12-3=9\n9+8=18", None) == 0.0
    assert aw.exact_match(PROMPT, "7+5=12\n12-3=9", None) == 0.0   # stopped early: 9 is not 17
    for garbled in ["", "seventeen", "9+8=", "9+8=17 apples", "17 18"]:
        assert aw.exact_match(PROMPT, garbled, "17") == 0.0
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        aw.exact_match("Sort the digits 321.", "123", None)


def test_step_check_labels_each_step_up_to_the_first_error():
    assert aw.step_check(PROMPT, "17", CHAIN) == [1.0, 1.0, 1.0]
    assert aw.step_check(PROMPT, None, CHAIN) == [1.0, 1.0, 1.0]
    assert aw.step_check(PROMPT, "17", ["7+5=12", "12-3=8", "8+8=16"]) == [1.0, 0.0, 0.0]   # error at step 2
    assert aw.step_check(PROMPT, "17", ["7+5=12", "12-3=8", "9+8=17"]) == [1.0, 0.0, 0.0]   # nothing after it counts
    assert aw.step_check(PROMPT, "17", ["7+5=12", "12-3=9"]) == [1.0, 0.0]                 # stopped early
    assert aw.step_check(PROMPT, "17", ["7+5=12"]) == [0.0]
    assert aw.step_check(PROMPT, "17", CHAIN + ["17+0=17"]) == [1.0, 1.0, 1.0, 0.0]         # past the chain
    assert aw.step_check(PROMPT, "17", CHAIN + ["done"]) == [1.0, 1.0, 1.0, 0.0]
    assert aw.step_check(PROMPT, "17", ["7 + 5 = 12", " 12-3 =9", "9+8= 17 "]) == [1.0, 1.0, 1.0]
    assert aw.step_check(PROMPT, "17", ["7+5=12", "12+3=15", "15+8=23"]) == [1.0, 0.0, 0.0]  # wrong operation
    assert aw.step_check(PROMPT, "17", ["5+7=12", "12-3=9", "9+8=17"]) == [0.0, 0.0, 0.0]   # operands swapped
    assert aw.step_check(PROMPT, "17", ["7+5=012", "12-3=9", "9+8=17"])[0] == 0.0
    assert aw.step_check(PROMPT, "17", []) == []
    for steps in (CHAIN, CHAIN[:2], CHAIN + CHAIN, ["x"] * 5):
        assert len(aw.step_check(PROMPT, "17", steps)) == len(steps)
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        aw.step_check("What is 2+2?", "4", ["2+2=4"])
    with pytest.raises(ValueError, match="is not the value"):
        aw.step_check(PROMPT, "18", CHAIN)


def test_the_minimum_of_the_step_scores_is_exact_match_for_chains():
    rng = random.Random(0)
    world = aw.ArithWorld(aw.ArithSizes(), seed=0)
    for _ in range(200):
        problem = world.draw(rng)
        prompt, lines, end = aw.prompt_of(problem), aw.step_lines(problem), aw.values_of(problem)[-1]
        for response in (lines, lines[:-1], lines + [f"{end}+1={end + 1}"],
                         aw.near_miss_chain(problem, rng).splitlines()):
            if response:
                assert min(aw.step_check(prompt, None, response)) == aw.exact_match(prompt, "\n".join(response), None)


def test_step_accuracy_counts_the_leading_right_steps():
    assert aw.step_accuracy(PROMPT, "\n".join(CHAIN)) == 1.0
    assert aw.step_accuracy(PROMPT, "7+5=12\n\n12-3=9\n") == pytest.approx(2 / 3)  # stopped early: partial credit
    assert aw.step_accuracy(PROMPT, "7+5=12\n12-3=8\n9+8=17") == pytest.approx(1 / 3)
    assert aw.step_accuracy(PROMPT, "\n".join(CHAIN + ["17+1=18"])) == 1.0
    assert aw.step_accuracy(PROMPT, "17") == 0.0 and aw.step_accuracy(PROMPT, "") == 0.0


def test_a_near_miss_is_consistent_after_one_error():
    rng = random.Random(1)
    world = aw.ArithWorld(aw.ArithSizes(), seed=1)
    for _ in range(200):
        problem = world.draw(rng)
        miss = aw.near_miss_chain(problem, rng).splitlines()
        right = aw.step_lines(problem)
        k = next(i for i, (a, b) in enumerate(zip(miss, right)) if a != b)
        assert aw.step_check(aw.prompt_of(problem), None, miss) == [1.0] * k + [0.0] * (len(right) - k)
        off = int(miss[k].split("=")[1]) - int(right[k].split("=")[1])
        assert off in (-2, -1, 1, 2)
        for line in miss[k + 1:]:  # each later line is right arithmetic from the wrong value
            a, op, b, c = aw._STEP.match(line).groups()
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0
        assert int(aw.final_answer("\n".join(miss))) - int(aw.reference_of(problem)) == off


def test_seeds_load_as_oasst_with_the_true_chain_first(world):
    data = load_seed_data(world["seeds"], "oasst", max_chars=20000)
    assert data.format == "oasst" and len(data.ift) == 30 and len(data.ranked) == 30
    assert all(aw.exact_match(s.instruction, s.response, None) == 1.0 for s in data.ift)
    for r in read_jsonl(world["seeds"]):
        prompt, (true, miss) = r["prompt"]["text"], r["prompt"]["replies"]
        assert aw.exact_match(prompt, true["text"], None) == 1.0 > aw.exact_match(prompt, miss["text"], None)


def test_the_task_grades_and_builds_judge_items(world):
    task = TASKS["arith"](SIZES)
    assert isinstance(task, ArithTask) and task.sizes_model() is aw.ArithSizes
    assert task.fixed_config(world)["model"] == {"base": "tiny", "tiny": {"corpus": str(world["corpus"])}}
    test = task.test_set(world)
    items = task.judge_items(3, world, test, 10)
    assert len(items) == 10 and items == task.judge_items(3, world, test, 10)
    for (prompt, right, wrong, ref), r in zip(items, test):
        assert prompt == r["prompt"] and right == r["solution"] and ref == r["reference"]
        assert task.value(prompt, right, ref) == 1.0 and task.value(prompt, wrong, ref) == 0.0
    graded = task.grade(test, [r["solution"] for r in test])
    assert graded["accuracy"] == graded["step_accuracy"] == 1.0 and all(graded["correct"])
    first_lines = [r["solution"].splitlines()[0] for r in test]  # one step of 2-4: no final value right
    graded = task.grade(test, first_lines)
    assert graded["accuracy"] == 0.0 and not any(graded["correct"])
    want = sum(1 / len(aw.parse_prompt(r["prompt"])[1]) for r in test) / len(test)
    assert graded["step_accuracy"] == pytest.approx(want)


def _row(seed, variant, model, accuracy, **extra):
    return {"seed": seed, "variant": variant, "model": model, "accuracy": accuracy, "judge_agreement": 0.5,
            "pairs": None if model == "M1" else 10, "pair_accuracy": None, "pair_inverted": None,
            "mean_tokens": 20.0, "sampled_accuracy": None, "own_score_right": None, "own_score_wrong": None, **extra}


def test_the_results_table_has_a_step_accuracy_column_only_where_rows_have_it():
    plain = [_row(s, "outcome", m, a) for s in (0, 1) for m, a in (("M1", 0.4), ("M2", 0.5))]
    header, body = table(summarise(plain))
    assert "step accuracy %" not in header and all(len(r) == len(header) for r in body)
    stepped = [_row(s, "step", m, a, step_accuracy=sa) for s in (0, 1) for m, a, sa in (("M1", 0.4, 0.6),
                                                                                         ("M2", 0.5, 0.7 + s / 10))]
    header, body = table(summarise(stepped), "exact match")
    col = header.index("step accuracy %")
    assert all(len(r) == len(header) for r in body)
    assert {r[1]: r[col] for r in body} == {"M1": "60.0 ± 0.0", "M2": "75.0 ± 7.1"}


@pytest.mark.slow
def test_an_arith_experiment_runs_every_variant_end_to_end(tmp_path, one_torch_thread):
    """configs/experiments/arith.yaml on a scratch model too small to learn, one iteration, every variant (DPO on
    outcome or step-wise pairs, GRPO with and without step credit, R1-Zero and a cold start): the step variants split
    and score candidates' steps in the registry, the outcome rule's pairs are right by ground truth, R1-Zero's M1 is
    the base itself, and the results table carries step accuracy."""
    from flywheel.analysis.experiment import load_experiment, run_experiment, write_results
    from flywheel.registry import Registry

    exp = load_experiment("configs/experiments/arith.yaml", [
        "seeds=[0]", "world={seeds: 12, pool: 12, test: 8, corpus_docs: 40}",
        "eval={judge_problems: 0, max_new_tokens: 24, batch_size: 8}",
        "config.run={iterations: 1, device: cpu}",
        "config.model={base: tiny, tiny: {vocab_size: 320, hidden_size: 32, intermediate_size: 64, num_layers: 1, "
        "num_heads: 2, num_kv_heads: 1, max_position: 512, pretrain_steps: 10, pretrain_batch_size: 4, "
        "split_digits: true}}",
        "config.sft={epochs: 1, learning_rate: 3.0e-3, batch_size: 8, max_length: 256}",
        "config.self_instruct={num_prompts: 6}", "config.generate={n: 4, temperature: 1.0, max_new_tokens: 24}",
        "config.dpo={learning_rate: 1.0e-4, epochs: 1, batch_size: 2, max_length: 256, dropout: 0.0}",
        "config.grpo={learning_rate: 1.0e-4, num_generations: 2, batch_size: 4, max_steps: 1, beta: 0.0, "
        "temperature: 1.0, max_completion_length: 16}"])
    rows = run_experiment(exp, tmp_path)
    write_results(exp, tmp_path, rows)
    assert {(r["variant"], r["model"]) for r in rows} >= {(v, "M1") for v in exp.variants}
    assert {(r["variant"], r["model"]) for r in rows} >= {("grpo-outcome", "M2"), ("grpo-step", "M2")}
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["step_accuracy"] <= 1 and r["test_problems"] == 8
        if r["pairs"] and r["variant"] == "outcome":  # the exact-match rule's own pairs: right over wrong
            assert r["pair_accuracy"] == 1.0
    m1 = {r["variant"]: r["model_id"] for r in rows if r["model"] == "M1"}
    with Registry(tmp_path) as reg:
        steps = reg.scalar("SELECT count(*) FROM steps")
        scored = reg.scalar("SELECT count(*) FROM step_rewards WHERE signal = 'step_rule' AND value IS NOT NULL")
        per_stage = [n for (n,) in reg.con.execute(
            "SELECT count(DISTINCT candidate_id) FROM steps GROUP BY stage_run_id").fetchall()]
        r1, pt = reg.model(m1["r1-zero"]), reg.model(reg.model(m1["outcome"])["parent_id"])
    assert steps > 0 and scored == steps and per_stage and all(0 < n <= 6 * 4 for n in per_stage)
    assert (r1["kind"], r1["path"], r1["parent_id"]) == ("base", pt["path"], pt["model_id"])  # R1-Zero: M1 is PT
    assert len({m1["outcome"], m1["r1-zero"], m1["cold-start"]}) == 3 and m1["outcome"] == m1["step"]
    md = (tmp_path / "experiments" / "arith" / "results.md").read_text()
    assert "step accuracy %" in md
