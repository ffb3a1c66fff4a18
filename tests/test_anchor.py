"""Temporal anchoring (`pairs.anchor: m1`, Temporal Self-Rewarding's anchored rejection): from iteration 2 the generate
stage also samples M1, and each pair's chosen is M_t's best candidate, its rejected M1's worst. Here: the config, the
pipeline's decision, the pair SQL on hand-written rows, real generation by two tiny models through the pipeline's
steps, the resume of a killed generate stage, and unchanged stage ids without anchoring."""

import hashlib
import json

import pytest

from flywheel import pipeline
from flywheel.analysis import report
from flywheel.config import ConfigError, load_config
from flywheel.registry import Registry
from flywheel.stage import IterationState, StageContext, stage_run_id
from flywheel.stages import generate as generate_stage
from flywheel.stages.generate import generate
from flywheel.stages.pairs import build_pairs
from tests.helpers.models import save_random_tiny_model
from tests.helpers.registry import candidate_row, insert_rows, judgment_row, prompt_row

M1, MT = "m1", "m2"  # the anchor (the SFT model) and M_t


def hashed_score(prompt: str, response: str, reference) -> float:
    """A rule reward (reward.rules, kind python) that scores any text in [0, 5), the same text the same score: real
    rows for the pairs stage without a judge (a random tiny model's verdicts never parse)."""
    return int(hashlib.sha256(response.encode()).hexdigest()[:8], 16) / 16 ** 8 * 5


RULE = ["reward.rules=[{name: h, kind: python, checker: 'tests.test_anchor:hashed_score'}]", "reward.weights={h: 1}"]


# --- the config and the pipeline's decision ---------------------------------------------------------------------------
def test_the_settings_default_to_off_and_bad_values_name_the_field():
    cfg = load_config(None, [])
    assert (cfg.pairs.anchor, cfg.generate.anchor_n) == ("none", None)
    cfg = load_config(None, ["pairs.anchor=m1", "generate.anchor_n=1"])
    assert (cfg.pairs.anchor, cfg.generate.anchor_n) == ("m1", 1)
    for overrides, words in ((["pairs.anchor=m2"], ["  pairs.anchor: ", "'none' or 'm1'"]),
                             (["generate.anchor_n=0"], ["  generate.anchor_n: ", "greater than or equal to 1"]),
                             (["generate.anchor_n=100000"], ["  generate.anchor_n: ", "512"]),
                             (["generate.anchor_n=true"], ["  generate.anchor_n: ", "true/false"]),
                             (["pairs.anchors=m1"], ["  pairs.anchors: ", "unknown key"]),
                             (["generate.anchor_n=3"], ["generate.anchor_n=3", "pairs.anchor is 'none'"])):
        with pytest.raises(ConfigError) as e:
            load_config(None, overrides)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_anchoring_applies_from_iteration_2_and_only_when_the_trainer_trains_on_pairs():
    def anchor(overrides, iteration, model):
        return pipeline.anchor_model(StageContext(load_config(None, overrides), "r", iteration),
                               IterationState(m1=M1, model=model))

    assert anchor([], 2, MT) is None                               # off by default
    assert anchor(["pairs.anchor=m1"], 1, M1) is None              # iteration 1: M_t is M1, the usual pairs
    assert anchor(["pairs.anchor=m1"], 2, MT) == M1
    per_iteration = ["pairs.anchor=m1", "train.trainer=[dpo, rs-sft, dpo]"]
    assert [anchor(per_iteration, t, MT) for t in (2, 3)] == [None, M1]  # RS-SFT's best of N: no M1 candidates
    assert anchor(["pairs.anchor=m1", "train.trainer=ppo"], 2, MT) is None
    assert {"model", "prompts", "m1"} <= set(pipeline.GENERATE.consumes)
    assert {"judgments", "rewards", "model", "m1"} <= set(pipeline.PAIRS.consumes)


# --- without anchoring, nothing changes -------------------------------------------------------------------------------
def test_without_anchoring_the_stage_ids_are_those_of_a_config_without_the_settings(tmp_path):
    """generate and pairs on empty inputs (nothing to sample or pair: no model is loaded) through the pipeline's steps:
    anchoring off, and on in iteration 1, give the ids the stages had before the settings existed."""
    section = load_config(None, []).generate.model_dump(mode="json")
    section.pop("anchor_n")  # the generate section as it was, without the setting

    def old_generate(model):  # the stage's inputs as they were before anchoring
        return stage_run_id("generate", {"model": model, "prompts": "si-x", "cfg": section, "seed": 0})

    old_pairs = stage_run_id("pairs", {"judgments": "judge-x", "rewards": None, "rho": 0.0, "min_margin": 0.0,
                                       "weights": [{"signal": "judge", "weight": 1.0}]})
    assert old_pairs == "pairs-2912ee78bb82b8ae"  # recorded from the code before anchoring existed

    def ids(overrides, iteration, model):
        cfg = load_config(None, [f"registry.root={tmp_path}", *overrides])
        ctx = StageContext(cfg, "r", iteration)
        state = IterationState(m1=M1, model=model, prompts="si-x", judgments="judge-x")
        return pipeline.GENERATE(ctx, state)[1].candidates, pipeline.PAIRS(ctx, state)[1].pairs

    assert ids([], 2, MT) == (old_generate(MT), old_pairs)
    assert ids(["pairs.anchor=m1"], 1, M1) == (old_generate(M1), old_pairs)      # iteration 1: M_t is M1
    anchored = ids(["pairs.anchor=m1"], 2, MT)
    assert anchored[0] != old_generate(MT) and anchored[1] != old_pairs
    assert ids(["pairs.anchor=m1", "generate.anchor_n=3"], 2, MT)[0] not in (anchored[0], old_generate(MT))


# --- the pair SQL on hand-written rows --------------------------------------------------------------------------------
def _write(reg, scores: dict[str, dict[str, tuple[str, list, int]]]) -> None:
    """prompt -> candidate -> (model, judge samples, tokens); candidates in stage "gen", judgments in "judge-a"."""
    prompts, cands, judgments = [], [], []
    for p, by_candidate in scores.items():
        prompts.append(prompt_row(p, f"question {p}", "si"))
        for c, (model, samples, tokens) in by_candidate.items():
            cands.append(candidate_row(c, p, f"answer {c}", "gen", model_id=model, num_tokens=tokens))
            judgments += [judgment_row(c, k, s, "judge-a") for k, s in enumerate(samples)]
    for table, rows in (("prompts", prompts), ("candidates", cands), ("judgments", judgments)):
        insert_rows(reg, table, rows)


def _pairs(cfg, anchor_id):
    result = build_pairs(cfg, "r", 2, "judge-a", None, anchor_id)
    with Registry(cfg.registry.root) as reg:
        rows = reg.rows("SELECT p.*, ch.model_id AS chosen_model, rj.model_id AS rejected_model FROM pairs p "
                        "JOIN candidates ch ON ch.candidate_id = p.chosen_id "
                        "JOIN candidates rj ON rj.candidate_id = p.rejected_id WHERE p.stage_run_id = ?",
                        [result.stage_run_id])
    return result, {r["prompt_id"]: r for r in rows}


def test_the_chosen_is_m_t_best_and_the_rejected_the_anchors_worst(cfg):
    cfg.pairs.min_margin = 0.5
    with Registry(cfg.registry.root) as reg:
        _write(reg, {
            "p1": {"a": (MT, [4], 2), "b": (MT, [2], 2), "c": (M1, [5], 2), "d": (M1, [1], 2)},  # plain: c vs d
            "p2": {"e": (MT, [2], 2), "f": (M1, [3], 2), "g": (M1, [4], 2)},     # M1's worst beats M_t's best
            "p3": {"h": (MT, [3], 2), "i": (MT, [4], 2), "j": (M1, [None], 2)},  # no M1 candidate scored
            "p4": {"k": (MT, [3], 2), "l": (M1, [3], 2)},                         # a tie
            "p5": {"m": (MT, [3.25], 2), "n": (M1, [3], 2)},                      # within pairs.min_margin
            "p6": {"o": (MT, [None], 2), "q": (M1, [2], 2)},                      # one scored candidate
            "p7": {"r": (MT, [5], 2), "s": (MT, [5], 2), "t": (M1, [0], 2), "u": (M1, [0], 2)},  # ties broken by id
        })
    plain, plain_pairs = _pairs(cfg, None)
    assert (plain_pairs["p1"]["chosen_id"], plain_pairs["p1"]["rejected_id"]) == ("c", "d")
    assert "anchor" not in plain.stats and "anchor" not in json.loads(plain_pairs["p1"]["signals"])

    result, pairs = _pairs(cfg, M1)
    assert result.stage_run_id != plain.stage_run_id
    assert {p: (r["chosen_id"], r["rejected_id"]) for p, r in pairs.items()} == {"p1": ("a", "d"), "p7": ("s", "t")}
    assert (pairs["p1"]["chosen_score"], pairs["p1"]["rejected_score"]) == (4.0, 1.0)
    assert all((r["chosen_model"], r["rejected_model"]) == (MT, M1) for r in pairs.values())
    signals = json.loads(pairs["p1"]["signals"])
    assert signals["anchor"] == M1 and signals["rho"] == 0.0 and signals["chosen"] == {"judge": 4.0}
    s = result.stats
    assert (s["pairs"], s["anchored"], s["anchor"], s["prompts_scored"]) == (2, 2, M1, 7)
    assert s["unpaired"] == {"no_scored_candidate": 0, "one_scored_candidate": 1, "tie": 1, "within_min_margin": 1,
                             "one_side_unscored": 1, "anchor_scored_higher": 1}
    assert build_pairs(cfg, "r", 2, "judge-a", None, M1).skipped  # done: the same id, not run again


def test_length_control_bands_are_taken_within_each_side(cfg):
    """rho = 0.5. Over all four candidates the top band [2.5, 5] would hold n and o (the shortest, o, chosen) and the
    bottom band [0, 2.5] q and r (the longest, r, rejected); within each side the top band of M_t's [4.9, 5] holds n
    alone and the bottom band of M1's [0, 0.15] q alone."""
    cfg.pairs.rho = 0.5
    with Registry(cfg.registry.root) as reg:
        _write(reg, {"p1": {"n": (MT, [5], 10), "o": (MT, [4.8], 2), "q": (M1, [0], 2), "r": (M1, [0.3], 10)}})
    _, plain = _pairs(cfg, None)
    assert (plain["p1"]["chosen_id"], plain["p1"]["rejected_id"]) == ("o", "r")
    _, anchored = _pairs(cfg, M1)
    assert (anchored["p1"]["chosen_id"], anchored["p1"]["rejected_id"]) == ("n", "q")
    assert json.loads(anchored["p1"]["signals"])["rho"] == 0.5


# --- two real tiny models, through the pipeline's steps --------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tiny_model_path, tmp_path_factory, one_torch_thread):
    """M1: the session's random tiny Llama; M_t: another one (its own seed)."""
    return {M1: tiny_model_path, MT: save_random_tiny_model(tmp_path_factory.mktemp("mt") / "mt", seed=1)}


def _registry(root, models, prompts: int = 4):
    """M1, M_t and PT (M1's weights) registered; `prompts` kept prompts in self-instruct stage "si"."""
    with Registry(root) as reg:
        for model_id, path in ((M1, models[M1]), (MT, models[MT]), ("pt", models[M1])):
            reg.register_model(model_id=model_id, run_id="r", name=model_id, kind="sft", iteration=0, parent_id=None,
                               path=str(path), stage_run_id="sft", config_hash="h", metrics={})
        insert_rows(reg, "prompts", [prompt_row(f"p{i}", f"Name a colour, number {i}.", "si") for i in range(prompts)])


def _config(root, *overrides):
    return load_config(None, [f"registry.root={root}", "run.device=cpu", "generate.n=2", "generate.max_new_tokens=4",
                              "generate.batch_size=2", *RULE, *overrides])


def _candidates(root, sid):
    with Registry(root) as reg:
        return reg.rows("SELECT candidate_id, prompt_id, sample_index, model_id, text, seed, sampling, num_tokens "
                        "FROM candidates "
                        "WHERE stage_run_id = ? ORDER BY candidate_id", [sid])


def test_an_anchored_iteration_2_samples_both_models_and_pairs_m_t_over_m1(tmp_path, models):
    _registry(tmp_path, models)
    cfg = _config(tmp_path, "pairs.anchor=m1", "generate.anchor_n=3")
    ctx, state = StageContext(cfg, "r", 2), IterationState(seeds="s", pt="pt", m1=M1, model=MT, prompts="si")
    assert [s.name for s in pipeline.steps_for(cfg, 2)] == ["self_instruct", "generate", "reward", "pairs", "dpo"]
    results = {}
    for step in (pipeline.GENERATE, pipeline.REWARD, pipeline.PAIRS):
        results[step.name], state = step(ctx, state)

    cands = _candidates(tmp_path, state.candidates)
    assert len(cands) == 4 * (2 + 3) and len({c["candidate_id"] for c in cands}) == 20
    by_model = {m: sorted({c["sample_index"] for c in cands if c["model_id"] == m}) for m in (MT, M1)}
    assert by_model == {MT: [0, 1], M1: [2, 3, 4]}  # M1's indices continue after generate.n
    assert {json.loads(c["sampling"])["n"] for c in cands if c["model_id"] == M1} == {3}
    assert len({c["seed"] for c in cands}) == 4  # 2 batches of M_t's, then 2 of M1's, each its own seed
    g = results["generate"].stats
    assert (g["candidates"], g["prompts"], g["anchor"], g["anchor_candidates"]) == (20, 4, M1, 12)
    assert results["reward"].stats["candidates"] == 20  # the reward stage scores every candidate of the stage

    with Registry(tmp_path) as reg:
        pairs = reg.rows("SELECT p.*, ch.model_id AS chosen_model, rj.model_id AS rejected_model FROM pairs p "
                         "JOIN candidates ch ON ch.candidate_id = p.chosen_id "
                         "JOIN candidates rj ON rj.candidate_id = p.rejected_id WHERE p.stage_run_id = ?",
                         [state.pairs])
        scores = {r["candidate_id"]: r["value"] for r in reg.rows(
            "SELECT candidate_id, value FROM rewards WHERE stage_run_id = ?", [state.rewards])}
    assert pairs and all((p["chosen_model"], p["rejected_model"]) == (MT, M1) for p in pairs)
    for p in pairs:  # M_t's best against M1's worst, by the rule's scores
        mine = [c for c in cands if c["prompt_id"] == p["prompt_id"]]
        assert p["chosen_score"] == max(scores[c["candidate_id"]] for c in mine if c["model_id"] == MT)
        assert p["rejected_score"] == min(scores[c["candidate_id"]] for c in mine if c["model_id"] == M1)
        assert json.loads(p["signals"])["anchor"] == M1
    s = results["pairs"].stats
    assert s["anchored"] == s["pairs"] == len(pairs) and s["anchor"] == M1
    with Registry(tmp_path) as reg:  # the report's candidate figures are M_t's; M1's are counted apart
        figures = report._candidates(reg, state.candidates, MT)
    assert (figures["candidates"], figures["anchor_candidates"]) == (8, 12)
    assert figures["mean_tokens"] == sum(c["num_tokens"] for c in cands if c["model_id"] == MT) / 8


def test_iteration_1_is_unchanged_by_anchoring(tmp_path, models):
    """M_t is M1: the anchored config's generate stage is the plain config's (the same id: found done, not re-run)."""
    _registry(tmp_path, models, prompts=2)
    state = IterationState(seeds="s", pt="pt", m1=M1, model=M1, prompts="si")
    plain = pipeline.GENERATE(StageContext(_config(tmp_path), "r", 1), state)[0]
    anchored = pipeline.GENERATE(StageContext(_config(tmp_path, "pairs.anchor=m1"), "r", 1), state)[0]
    assert anchored.skipped and anchored.stage_run_id == plain.stage_run_id
    assert "anchor" not in plain.stats
    assert {c["model_id"] for c in _candidates(tmp_path, plain.stage_run_id)} == {M1}


def test_a_killed_anchored_generate_stage_resumes_without_redoing_batches(tmp_path, models, monkeypatch):
    """Killed in M1's second batch (after M_t's two and M1's first were committed): the rerun generates that batch
    alone, and the stage holds exactly what an uninterrupted run writes."""
    calls = []
    real = generate_stage.backend_for

    def counting(cfg, reg, model_id, fail_at=None):
        backend = real(cfg, reg, model_id)

        class Counted:
            def generate(self, prompts, params, **kw):
                calls.append((model_id, tuple(prompts)))
                if len(calls) == fail_at:
                    raise RuntimeError("killed")
                return backend.generate(prompts, params, **kw)
        return Counted()

    _registry(tmp_path / "a", models)
    cfg = _config(tmp_path / "a", "pairs.anchor=m1")
    monkeypatch.setattr(generate_stage, "backend_for", lambda *a: counting(*a, fail_at=4))
    with pytest.raises(RuntimeError, match="killed"):
        generate(cfg, "r", 2, MT, "si", anchor_id=M1)
    assert [m for m, _ in calls] == [MT, MT, M1, M1]
    sid = stage_run_id("generate", {"model": MT, "prompts": "si", "seed": 0, "anchor": {"model": M1, "n": 2},
                                    "cfg": cfg.generate.model_dump(mode="json", exclude={"anchor_n"})})
    assert len(_candidates(tmp_path / "a", sid)) == 3 * 2 * 2  # three batches of 2 prompts x 2 candidates

    calls.clear()
    monkeypatch.setattr(generate_stage, "backend_for", lambda *a: counting(*a))
    resumed = generate(cfg, "r", 2, MT, "si", anchor_id=M1)
    assert resumed.stage_run_id == sid and not resumed.skipped
    assert calls == [(M1, ("Name a colour, number 2.", "Name a colour, number 3."))]  # the missing batch alone

    _registry(tmp_path / "b", models)
    whole = generate(_config(tmp_path / "b", "pairs.anchor=m1"), "r", 2, MT, "si", anchor_id=M1)
    assert whole.stage_run_id == sid
    assert _candidates(tmp_path / "a", sid) == _candidates(tmp_path / "b", sid)
