"""Process rewards (flywheel/stages/steps.py): splitting, the step rule, the step judge's strict parser, aggregation;
the reward stage's steps and step rewards on a real DuckDB file; step-wise pairs built in SQL from them."""

import json
import re

import pytest

from flywheel.config import ConfigError, StepsConfig, load_config
from flywheel.registry import Registry
from flywheel.registry.datasets import read_version, stage_version
from flywheel.stages import steps as st
from flywheel.stages.pairs import build_pairs
from flywheel.stages.reward import reward
from tests.helpers.registry import candidate_row, insert_rows, prompt_row


def chain_rule(prompt, reference, steps):
    """A step rule for 'Compute 1+2+3.': step k right iff it is `<running>+<next>=<sum>` with every step before it
    right (first-error labelling)."""
    nums = [int(n) for n in re.findall(r"\d+", prompt)]
    out, run, ok = [], nums[0], True
    for k, s in enumerate(steps):
        nxt = nums[k + 1] if k + 1 < len(nums) else None
        ok = ok and nxt is not None and s.replace(" ", "") == f"{run}+{nxt}={run + nxt}"
        out.append(float(ok))
        run = run + nxt if nxt is not None else run
    return out


def short_rule(prompt, reference, steps):
    return [1.0] * (len(steps) - 1)  # one score too few


# --- pure functions ----------------------------------------------------------------------------------------------------
def test_split_by_line_delimiter_and_regex_keeps_spans():
    text = "  1+2=3\n\n3+3=6  \n  \nanswer 6"
    steps = st.split_steps(text, StepsConfig(split="line", rule="m:f"))
    assert [s.text for s in steps] == ["1+2=3", "3+3=6", "answer 6"]
    assert all(text[s.start:s.end] == s.text for s in steps) and [s.index for s in steps] == [0, 1, 2]
    para = "First, add.\nStill first.\n\nThen check.\n\n\n"
    assert [s.text for s in st.split_steps(para, StepsConfig(split="delimiter", delimiter="\n\n", rule="m:f"))] == [
        "First, add.\nStill first.", "Then check."]
    marked = "Step 1: add 1 and 2. Step 2: add 3. Step 3: done"
    got = st.split_steps(marked, StepsConfig(split="regex", pattern=r"Step \d+:", rule="m:f"))
    assert [s.text for s in got] == ["add 1 and 2.", "add 3.", "done"]
    assert st.split_steps("", StepsConfig(split="line", rule="m:f")) == []
    capped = st.split_steps("a\nb\nc\nd", StepsConfig(split="line", rule="m:f", max_steps=2))
    assert [s.text for s in capped] == ["a", "b\nc\nd"]


def test_prefix_hashes_are_equal_exactly_while_steps_agree():
    a, b = st.prefix_hashes(["x", "y", "z"]), st.prefix_hashes(["x", "y", "w", "v"])
    assert a[:3] == b[:3]  # step 2 continues the same two steps in both
    c = st.prefix_hashes(["x", "q", "z"])
    assert c[:2] == a[:2] and c[2] != a[2]


def test_step_rule_scores_and_its_failures():
    assert st.rule_step_scores(chain_rule, "t:chain", "Compute 1+2+3.", "6", ["1+2=3", "3+3=7"]) == [1.0, 0.0]
    with pytest.raises(st.StepRewardError, match="returned 1 scores for 2 steps"):
        st.rule_step_scores(short_rule, "t:short", "p", None, ["a", "b"])
    with pytest.raises(st.StepRewardError, match="raised ZeroDivisionError"):
        st.rule_step_scores(lambda p, r, s: [1 / 0], "t:div", "p", None, ["a"])
    with pytest.raises(st.StepRewardError, match="not a finite number"):
        st.rule_step_scores(lambda p, r, s: [float("nan")], "t:nan", "p", None, ["a"])
    with pytest.raises(ConfigError, match="steps.rule: module 'tests.test_steps' has no function 'nope'"):
        st.load_step_rule("tests.test_steps:nope")


@pytest.mark.parametrize("text, expected", [
    ("The sum is right.\nVerdict: correct", (1.0, None)),
    ("verdict: Incorrect.", (0.0, None)),
    ("**Verdict: correct**", (1.0, None)),
    ("Verdict: correct\nVerdict: incorrect", (None, "conflicting_verdicts")),
    ("Verdict: maybe", (None, "unrecognised_verdict")),
    ("It looks fine to me.", (None, "no_verdict")),
    ("The verdict is correct", (None, "no_verdict")),
])
def test_step_verdicts_are_parsed_strictly(text, expected):
    assert st.parse_step_verdict(text) == expected


def test_aggregation():
    assert st.aggregate([1.0, 0.5, 0.8], "min") == 0.5
    assert st.aggregate([1.0, 0.5, 0.8], "product") == pytest.approx(0.4)
    assert st.aggregate([1.0, 0.5, 0.75], "mean") == pytest.approx(0.75)
    assert st.aggregate([1.0, None], "min") is None and st.aggregate([], "mean") is None


def test_step_judge_prompt_shows_the_steps_so_far():
    template = "Q: {instruction}\nBefore:\n{previous_steps}\nCheck: {step}"
    assert st.step_judge_prompt(template, "Compute 1+2+3.", ["1+2=3", "3+3=6"], 1) == (
        "Q: Compute 1+2+3.\nBefore:\n1. 1+2=3\nCheck: 2. 3+3=6")
    assert st.NO_PREVIOUS_STEPS in st.step_judge_prompt(template, "q", ["a"], 0)


def test_config_refuses_what_cannot_run():
    for overrides, match in [
        (["steps.split=line"], "no step reward"),
        (["steps.split=regex", "steps.rule=a:b"], "split=regex needs 'pattern'"),
        (["steps.split=regex", "steps.pattern=(", "steps.rule=a:b"], "not a valid regex"),
        (["steps.split=line", "steps.rule=nocolon"], "not of the form 'module:function'"),
        (["reward.weights={step_rule: 1}"], "step_rule needs steps.split and steps.rule"),
        (["pairs.mode=step"], "pairs.mode=step chooses by the step rewards"),
        (["steps.split=line", "steps.judge=true", "steps.credit=1"], "credit > 0 needs split and rule"),
        (["steps.rule=a:b", "steps.credit=1"], "credit > 0 needs split and rule"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(match) if "(" not in match else match):
            load_config(None, overrides)
    cfg = load_config(None, ["steps.split=line", "steps.rule=a:b", "steps.judge=true",
                             "reward.weights={step_rule: 1, step_judge: 0.5}", "pairs.mode=step"])
    assert cfg.steps.signals() == ["step_rule", "step_judge"]


# --- the reward stage and step-wise pairs on a real registry -----------------------------------------------------------
CANDIDATES = {  # prompt -> candidate -> text
    "p1": {"c1": "1+2=3\n3+3=6", "c2": "1+2=3\n3+3=7", "c3": "1+2=4\n4+3=7"},
    "p2": {"c4": "2+2=4", "c5": "2+2=4"},                      # the same text: no fork
    "p3": {"c6": "2+1=3\n3+1=5", "c7": "2+1=3\n3+1=9"},        # a fork whose two steps are both wrong: a tie
}
PROMPTS = {"p1": "Compute 1+2+3.", "p2": "Compute 2+2.", "p3": "Compute 2+1+1."}


def steps_registry(tmp_path, *overrides):
    cfg = load_config(None, [f"registry.root={tmp_path / 'reg'}", "run.device=cpu", "reward.batch_size=3",
                             "steps.split=line", "steps.rule=tests.test_steps:chain_rule",
                             "reward.weights={step_rule: 1}", *overrides])
    with Registry(cfg.registry.root) as reg:
        insert_rows(reg, "prompts", [prompt_row(p, t, "si") for p, t in PROMPTS.items()])
        insert_rows(reg, "candidates", [candidate_row(c, p, text, "gen") for p, cs in CANDIDATES.items()
                                        for c, text in cs.items()])
    return cfg


def test_reward_stage_stores_steps_step_rewards_and_their_aggregate(tmp_path, monkeypatch):
    cfg = steps_registry(tmp_path)
    result = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    with Registry(cfg.registry.root) as reg:
        steps = reg.rows("SELECT candidate_id, step_index, text, start_char, end_char, prefix_hash FROM steps "
                         "ORDER BY candidate_id, step_index")
        per_step = {(r["candidate_id"], r["step_index"]): r["value"] for r in reg.rows(
            "SELECT candidate_id, step_index, value FROM step_rewards WHERE signal = 'step_rule'")}
        outcome = {r["candidate_id"]: r for r in reg.rows("SELECT * FROM rewards WHERE signal = 'step_rule'")}
        texts = {c: t for cs in CANDIDATES.values() for c, t in cs.items()}
    assert len(steps) == 12 and all(texts[s["candidate_id"]][s["start_char"]:s["end_char"]] == s["text"] for s in steps)
    by = {(s["candidate_id"], s["step_index"]): s for s in steps}
    assert by[("c1", 1)]["prefix_hash"] == by[("c2", 1)]["prefix_hash"] != by[("c3", 1)]["prefix_hash"]
    assert [per_step[("c1", k)] for k in (0, 1)] == [1.0, 1.0]
    assert [per_step[("c2", k)] for k in (0, 1)] == [1.0, 0.0]
    assert [per_step[("c3", k)] for k in (0, 1)] == [0.0, 0.0]
    assert {c: r["value"] for c, r in outcome.items()} == {"c1": 1.0, "c2": 0.0, "c3": 0.0, "c4": 1.0, "c5": 1.0,
                                                           "c6": 0.0, "c7": 0.0}  # min over the steps
    assert json.loads(outcome["c2"]["details"]) == {"aggregate": "min", "steps": 2, "step_values": [1.0, 0.0]}
    assert result.stats["steps"]["steps"] == 12 and result.stats["steps"]["candidates"] == 7
    assert result.stats["signals"]["step_rule"] == {"count": 7, "mean": pytest.approx(3 / 7, abs=1e-4), "failures": 0}

    # resumed after the ledger lost its end: every batch is committed, nothing is scored again
    def no_rule(spec):
        raise AssertionError("a finished batch was scored again")

    with Registry(cfg.registry.root) as reg:
        reg.con.execute("UPDATE stage_runs SET status = 'running' WHERE stage = 'reward'")
    monkeypatch.setattr("flywheel.stages.reward.st.load_step_rule", lambda spec: no_rule)
    again = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    assert again.stats["signals"] == result.stats["signals"]


def test_a_failing_step_rule_is_a_counted_failure_not_a_zero(tmp_path):
    cfg = steps_registry(tmp_path, "steps.rule=tests.test_steps:short_rule", "steps.aggregate=mean")
    result = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    with Registry(cfg.registry.root) as reg:
        outcome = reg.rows("SELECT value, error FROM rewards WHERE signal = 'step_rule'")
        steps = reg.rows("SELECT value, error FROM step_rewards")
    assert all(r["value"] is None and "scores for" in r["error"] for r in outcome)
    assert all(r["value"] is None and "short_rule" in r["error"] for r in steps)
    assert result.stats["signals"]["step_rule"]["failures"] == 7


def test_step_pairs_take_the_deepest_fork_and_record_it(tmp_path):
    cfg = steps_registry(tmp_path, "pairs.mode=step")
    rewards = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    result = build_pairs(cfg, "run", 1, None, rewards.stage_run_id)
    with Registry(cfg.registry.root) as reg:
        pairs = reg.rows("SELECT * FROM pairs")
        train = read_version(reg, stage_version(reg, result.stage_run_id, "train")).to_pylist()
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair["prompt_id"], pair["chosen_id"], pair["rejected_id"]) == ("p1", "c1", "c2")  # forked at step 1
    signals = json.loads(pair["signals"])
    assert signals["mode"] == "step" and signals["chosen"]["step"] == 1 and signals["chosen"]["at"] == 6
    assert (pair["chosen_score"], pair["rejected_score"]) == (1.0, 0.0)
    assert result.stats["unpaired"] == {"no_scored_step": 0, "no_fork": 1, "forks_within_min_margin": 1}
    assert result.stats["fork_steps"] == {"1": 1}
    assert train[0]["chosen"] == "1+2=3\n3+3=6" and train[0]["rejected"] == "1+2=3\n3+3=7"
    from flywheel.analysis.report import _process

    with Registry(cfg.registry.root) as reg:  # the report's figures, from the two stages' ledger rows
        process = _process(reg, rewards.stage_run_id, result.stage_run_id)["process"]
    assert (process["steps"], process["candidates"], process["fork_steps"]) == (12, 7, {"1": 1})
    assert process["signals"]["step_rule"]["scored"] == 12
    # outcome pairs from the same step rewards (the aggregate as a signal): best vs worst, here c1 vs c2 or c3
    outcome_cfg = steps_registry(tmp_path / "o")
    rw = reward(outcome_cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    out = build_pairs(outcome_cfg, "run", 1, None, rw.stage_run_id)
    assert out.stats["pairs"] == 1 and "mode" not in out.stats


def test_lineage_of_a_step_pair_shows_each_side_s_steps_and_their_scores(tmp_path):
    from rich.console import Console

    from flywheel.registry.lineage import lineage, render

    cfg = steps_registry(tmp_path, "pairs.mode=step")
    rewards = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    build_pairs(cfg, "run", 1, None, rewards.stage_run_id)
    with Registry(cfg.registry.root) as reg:
        pair_id = reg.scalar("SELECT pair_id FROM pairs")
        got = lineage(reg, pair_id)
    assert [(x["text"], x["scores"]) for x in got["chosen"]["steps"]] == [("1+2=3", {"step_rule": 1.0}),
                                                                           ("3+3=6", {"step_rule": 1.0})]
    assert [x["scores"]["step_rule"] for x in got["rejected"]["steps"]] == [1.0, 0.0]
    console = Console(record=True, width=200)
    console.print(render(got))
    text = console.export_text()
    assert "steps (2)" in text and "#1 [step_rule 0] 3+3=7" in text


def test_best_of_n_for_rs_sft_by_the_aggregated_step_score(tmp_path):
    from flywheel.stages.pairs import combined_scores
    from flywheel.training.sft import best_of_n

    cfg = steps_registry(tmp_path)
    rewards = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    with Registry(cfg.registry.root) as reg:
        scored = combined_scores(reg, cfg, judge_sid=None, reward_sid=rewards.stage_run_id)
    kept, below = best_of_n(scored, min_score=1.0)
    assert {r["prompt_id"]: r["candidate_id"] for r in kept} == {"p1": "c1", "p2": "c5"} and below == 1


def test_preflight_names_a_bad_step_rule_or_step_judge_template(tmp_path):
    from flywheel.pipeline import preflight

    with pytest.raises(ConfigError, match="steps.rule: cannot import module 'no_such_module'"):
        preflight(load_config(None, ["steps.split=line", "steps.rule=no_such_module:f"]))
    bad = tmp_path / "step_judge.txt"
    bad.write_text("Judge {instruction} and {step}.")
    with pytest.raises(ConfigError, match="steps.judge_template: .* has no {previous_steps} field"):
        preflight(load_config(None, ["steps.split=line", "steps.judge=true", f"steps.judge_template={bad}"]))


def test_the_step_judge_runs_m_t_on_each_step_and_counts_what_it_cannot_parse(tmp_path):
    """A real (random, tiny) M_t judges every step through the transformers backend: it writes no verdict, so every
    sample is a counted parse failure and no candidate gets a step_judge aggregate (NULL with the step named), while
    the step rule's scores beside it are stored as usual."""
    from flywheel.backends.models import save_atomically
    from flywheel.registry import now
    from tests.helpers.models import seed_tokenizer, tiny_model

    tok = seed_tokenizer()
    save_atomically(tiny_model(tok, 0).eval(), tok, tmp_path / "mt")
    cfg = steps_registry(tmp_path, "steps.judge=true", "steps.judge_samples=2", "steps.judge_max_new_tokens=6",
                         "reward.weights={step_rule: 1, step_judge: 1}")
    with Registry(cfg.registry.root) as reg:
        reg.register_model(model_id="m-t", run_id="run", name="M1", kind="sft", iteration=0, parent_id=None,
                           path=str(tmp_path / "mt"), stage_run_id="test", config_hash="h", created_at=now())
    result = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    with Registry(cfg.registry.root) as reg:
        judged = reg.rows("SELECT * FROM step_rewards WHERE signal = 'step_judge' ORDER BY step_reward_id")
        outcome = reg.rows("SELECT value, error FROM rewards WHERE signal = 'step_judge'")
        template = reg.scalar("SELECT count(*) FROM templates WHERE name = 'step_judge'")
    assert len(judged) == 12 and all(r["judge_model_id"] == "m-t" for r in judged)
    details = [json.loads(r["details"]) for r in judged]
    assert all(len(d["raw"]) == 2 and set(d["errors"]) <= {"no_verdict", "unrecognised_verdict"} for d in details)
    assert all(r["value"] is None for r in judged) and template == 1
    assert all(r["value"] is None and r["error"].startswith("step 0:") for r in outcome)
    stats = result.stats["steps"]
    assert sum(stats["judge_parse_failures"].values()) == 24 and stats["signals"]["step_judge"]["scored"] == 0
    assert stats["signals"]["step_rule"]["scored"] == 12


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_dpo_trains_on_step_pairs_frozen_by_the_pairs_stage(tmp_path):
    """Real DPO steps on the step-wise pairs: the trainer reads the pairs stage's frozen train version."""
    from flywheel.registry import now
    from flywheel.stage import IterationState, StageContext
    from flywheel.training.dpo import train_dpo
    from tests.helpers.models import save_random_tiny_model

    path = save_random_tiny_model(tmp_path / "m1")
    cfg = steps_registry(tmp_path, "pairs.mode=step", "dpo.batch_size=2", "dpo.max_length=64",
                         "dpo.learning_rate=1e-3")
    with Registry(cfg.registry.root) as reg:
        reg.register_model(model_id="m1", run_id="run", name="M1", kind="sft", iteration=0, parent_id=None,
                           path=str(path), stage_run_id="test", config_hash="h", created_at=now())
    rewards = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m1")
    pairs = build_pairs(cfg, "run", 1, None, rewards.stage_run_id)
    result = train_dpo(StageContext(cfg, "run", 1), IterationState(model="m1", pairs=pairs.stage_run_id, m1="m1"))
    with Registry(cfg.registry.root) as reg:
        row = reg.model(result.stats["model_id"])
    assert row["dataset_version"] == pairs.stats["dataset_versions"]["train"]
    metrics = json.loads(row["metrics"])
    assert metrics["pairs"] == 1 and metrics["steps"] >= 1


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_r1_zero_skips_m1_s_sft_and_a_cold_start_trains_on_a_few_seed_chains(tmp_path):
    from flywheel.pipeline import run_bootstrap
    from flywheel.registry.integrity import model_path
    from flywheel.registry.runs import run_id_for

    common = [f"registry.root={tmp_path / 'reg'}", "model.tiny.pretrain_steps=5", "sft.epochs=1"]
    skip = load_config("tests/small.yaml", [*common, "sft.mode=skip"])
    state = run_bootstrap(skip, run_id_for(skip))
    with Registry(skip.registry.root) as reg:
        m1, pt = reg.model(state.m1), reg.model(state.pt)
        assert (m1["name"], m1["parent_id"], m1["path"]) == ("M1", pt["model_id"], pt["path"])
        assert m1["weights_sha256"] == pt["weights_sha256"] and model_path(reg, state.m1) == model_path(reg, state.pt)
    assert state.model == state.m1 != state.pt

    cold = load_config("tests/small.yaml", [*common, "sft.mode=cold_start", "sft.cold_start_examples=3"])
    state2 = run_bootstrap(cold, run_id_for(cold))
    assert state2.pt == state.pt  # the same base, built once
    with Registry(cold.registry.root) as reg:
        row = reg.model(state2.m1)
        stats = json.loads(reg.scalar("SELECT stats FROM stage_runs WHERE stage_run_id = ?", [state2.m1]))
    assert row["kind"] == "sft" and row["parent_id"] == state.pt
    assert (stats["ift"], stats["eft"], stats["cold_start"]) == (3, 0, True)


def test_the_browse_pair_page_shows_the_steps_and_marks_the_fork(tmp_path):
    from flywheel.browse.pages import pair_page
    from flywheel.registry.lineage import lineage

    cfg = steps_registry(tmp_path, "pairs.mode=step")
    rewards = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    build_pairs(cfg, "run", 1, None, rewards.stage_run_id)
    with Registry(cfg.registry.root) as reg:
        html = pair_page(lineage(reg, reg.scalar("SELECT pair_id FROM pairs")), [])
    assert html.count("<h4>steps (2)</h4>") == 2 and html.count("<b>1</b> (fork)") == 2
    assert "step_rule 0</td>" in html and "3+3=7" in html


def test_step_pairs_prefer_a_chosen_chain_right_to_its_end_among_forks_as_deep(tmp_path):
    """c8 and c1 both fork from c2 at step 1 with the right step; c8 then writes a step too many (scored 0). The pair
    takes c1, whose every step is right, so DPO's NLL term on the chosen text trains on no wrong step."""
    cfg = steps_registry(tmp_path, "pairs.mode=step")
    with Registry(cfg.registry.root) as reg:
        insert_rows(reg, "candidates", [candidate_row("c8", "p1", "1+2=3\n3+3=6\n6+1=7", "gen")])
    rewards = reward(cfg, "run", 1, "gen", "m-sft", "m-pt", "m-t")
    build_pairs(cfg, "run", 1, None, rewards.stage_run_id)
    with Registry(cfg.registry.root) as reg:
        pair = reg.rows("SELECT * FROM pairs WHERE prompt_id = 'p1'")[0]
    signals = json.loads(pair["signals"])
    assert (pair["chosen_id"], pair["rejected_id"], signals["chosen"]["step"]) == ("c1", "c2", 1)
    assert (signals["chosen"]["worst_step"], signals["rejected"]["worst_step"]) == (1.0, 0.0)


def test_the_shipped_r1_zero_config_loads_and_passes_preflight():
    """configs/r1_zero.yaml: no SFT, GRPO with the outcome rule and step credit, on the shipped arithmetic prompts
    (each parsed by the world's rules, with an instruction after the sum)."""
    from flywheel.analysis import arithworld as aw
    from flywheel.analysis.miniworld import read_jsonl
    from flywheel.pipeline import preflight

    cfg = load_config("configs/r1_zero.yaml")
    preflight(cfg)
    assert (cfg.sft.mode, cfg.train.trainer, cfg.steps.credit) == ("skip", "grpo", 1.0)
    rows = read_jsonl(cfg.self_instruct.prompts_file)
    assert len(rows) == 200 and all(aw.parse_prompt(r["prompt"]) for r in rows)
    right = [aw.solution_of(aw.parse_prompt(r["prompt"])) for r in rows[:5]]
    assert all(aw.exact_match(r["prompt"], y, r["reference"]) == 1.0 for r, y in zip(rows, right))
