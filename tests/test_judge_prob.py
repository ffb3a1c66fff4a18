"""The probability judge (`judge.mode: prob`): next-token probabilities of "0".."5" after "Score:" from the
transformers backend, the expected score, the judge stage's one row per candidate (resumable, skipped when done), the
refusal on other backends, and `flywheel eval judge` in prob mode. Two tiny models: a random one (little probability
on digits, so its rows are counted low_prob_mass failures) and one taught in a few steps to answer "Score: N"."""

import json

import pytest
import torch

from flywheel.analysis.eval_judge import Agreement, agreement, by_prompt, judge_ranked
from flywheel.backends import Generation, OpenAIBackend, TransformersBackend, release_backends
from flywheel.backends.models import load, save_atomically
from flywheel.cli import main
from flywheel.config import ConfigError, OpenAIBackendConfig, load_config
from flywheel.registry import Registry, now
from flywheel.stages import judge
from flywheel.stages.judge import (
    MIN_PROB_MASS,
    PROB_PREFIX,
    SCORE_CHOICES,
    Verdicts,
    check_judge,
    prob_verdict,
    verdicts,
)
from flywheel.stages.seeds import load_seed_data
from tests.helpers.models import save_random_tiny_model, teach_score_format

COMPACT = "prompts/judge_compact.txt"
OASST = "tests/fixtures/seeds/oasst.jsonl"
PROMPTS = ["What is a noun?", "List three colours.", "Explain why ice floats on water, briefly please."]
# prompt -> its candidates' texts
CANDIDATES = {"What is a noun?": ["A word that names a thing.", "Blue.", "A noun names a person, place or thing."],
              "List three colours.": ["Red, green, blue.", "I like cake."]}


@pytest.fixture(scope="module", autouse=True)
def _release(one_torch_thread):
    yield
    release_backends()


def _fill(prompt: str, reply: str) -> str:
    return open(COMPACT, encoding="utf-8").read().format(instruction=prompt, response=reply)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"random": a random tiny Llama, "taught": the same given 30 optimiser steps (4 prompts each) to answer the
    compact judge prompt with "Score: N" (N random in 0-5; this tokenizer writes " 0" and " 5" as a space token then
    the digit, as SmolLM2's does for every digit, so both ways a choice can follow "Score:" carry real probability)."""
    root = tmp_path_factory.mktemp("judge-prob")
    random_path = save_random_tiny_model(root / "random")
    model, tok = load(random_path, "cpu")
    data = load_seed_data(OASST)
    heads = [tok.apply_chat_template([{"role": "user", "content": _fill(p.instruction, r.text)}], tokenize=False,
                                     add_generation_prompt=True) for p in data.ranked for r in p.replies]
    torch.manual_seed(0)
    teach_score_format(model, tok, heads, steps=30)
    save_atomically(model, tok, root / "taught")
    return {"random": random_path, "taught": root / "taught"}


@pytest.fixture(scope="module")
def backends(models):
    return {name: TransformersBackend(str(path), "cpu") for name, path in models.items()}


# --- the backend ------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a tiny model taught the verdict format
def test_choice_probs_are_raw_probabilities_batched_like_alone(backends):
    texts = [_fill(p, "Some reply.") for p in PROMPTS]
    for backend in backends.values():
        batched = backend.choice_probs(texts, PROB_PREFIX, SCORE_CHOICES, batch_size=2)  # two batches, padded
        assert len(batched) == 3 and all(len(p) == 6 for p in batched)
        for probs in batched:
            assert all(0.0 <= p <= 1.0 for p in probs)
            assert sum(probs) <= 1.0 + 1e-6  # no token counted twice (" 0" is " " + "0" here: the space is not)
        alone = [backend.choice_probs([t], PROB_PREFIX, SCORE_CHOICES, batch_size=1)[0] for t in texts]
        for a, b in zip(alone, batched):  # left padding takes no position: a prompt's answer ignores its neighbours
            assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.slow  # a tiny model taught the verdict format
def test_choice_probs_count_the_choice_with_and_without_a_space(backends):
    """Against two plain unbatched passes. This tokenizer writes " 1".." 4" as one token each, but " 0" and " 5" as a
    space token then the digit: p(" 0") is p(space) * p("0" after the space), never p(space) alone (it would count
    one token for two choices)."""
    tok = backends["taught"].tokenizer
    space = tok.encode(" ", add_special_tokens=False)
    assert len(space) == 1 and tok.encode(" 0", add_special_tokens=False)[0] == space[0]  # the case this test is for
    assert len(tok.encode(" 3", add_special_tokens=False)) == 1
    for backend in backends.values():
        text = _fill(PROMPTS[0], "A word.")
        ids = tok(backend._format(text, chat=True) + PROB_PREFIX, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            first = torch.softmax(backend.model(torch.tensor([ids])).logits[0, -1], -1).tolist()
            after = torch.softmax(backend.model(torch.tensor([ids + space])).logits[0, -1], -1).tolist()
        probs = backend.choice_probs([text], PROB_PREFIX, SCORE_CHOICES, batch_size=1)[0]
        for c, p in zip(SCORE_CHOICES, probs):
            digit, spaced = tok.encode(c, add_special_tokens=False), tok.encode(" " + c, add_special_tokens=False)
            assert len(digit) == 1
            expected = first[digit[0]] + (first[spaced[0]] if len(spaced) == 1 else first[space[0]] * after[digit[0]])
            assert p == pytest.approx(expected, abs=1e-6)


def test_other_backends_refuse_choice_probs_by_name():
    backend = OpenAIBackend("m", OpenAIBackendConfig(base_url="http://127.0.0.1:9/v1"))
    try:
        with pytest.raises(NotImplementedError, match=r"openai backend .*judge\.mode=prob needs "
                                                      r"generate\.backend=transformers"):
            backend.choice_probs(["q"], PROB_PREFIX, SCORE_CHOICES, batch_size=1)
    finally:
        backend.close()


# --- the verdict ------------------------------------------------------------------------------------------------------
def test_prob_verdict_is_the_expected_score_of_the_renormalised_probabilities():
    score, raw, error = prob_verdict([0.1, 0.0, 0.2, 0.3, 0.0, 0.1])
    assert error is None and score == pytest.approx((2 * 0.2 + 3 * 0.3 + 5 * 0.1) / 0.7)
    shown = json.loads(raw)
    assert shown["mass"] == pytest.approx(0.7) and sum(shown["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert shown["probs"][3] == pytest.approx(0.3 / 0.7, abs=1e-6)
    assert prob_verdict([0.0, 0, 0, 0, 0, 0.9]) == (5.0, '{"probs":[0.0,0.0,0.0,0.0,0.0,1.0],"mass":0.9}', None)
    assert prob_verdict([0.01] * 6)[0] == pytest.approx(2.5)  # mass 0.06: enough
    score, raw, error = prob_verdict([0.008] * 6)  # mass 0.048: under MIN_PROB_MASS, never guessed
    assert (score, error) == (None, "low_prob_mass") and json.loads(raw)["mass"] == pytest.approx(0.048)
    assert prob_verdict([0.0] * 6)[::2] == (None, "low_prob_mass")  # no division by zero
    with pytest.raises(ValueError, match="expected 6 probabilities"):
        prob_verdict([0.5, 0.5])


def test_verdicts_fill_the_template_and_parse_or_take_the_expected_score():
    """`judge.verdicts`, the one judging function of the judge stage, eval judge and the experiment, on a fake
    backend: the filled prompts, the seed and the sampling it passes, the per-sample scores and errors, the mean."""
    seen = {}

    class Fake:
        def generate(self, prompts, params, *, seed, chat):
            seen.update(prompts=prompts, n=params.n, seed=seed, chat=chat)
            return [[Generation(t, 2, "stop") for t in texts]
                    for texts in (["Score: 4", "Score: 2", "no verdict"], ["Score: 9", "", "Score: 3"])][:len(prompts)]

        def choice_probs(self, prompts, prefix, choices, *, batch_size):
            seen.update(prompts=prompts, prefix=prefix, batch_size=batch_size)
            return [[0.0, 0, 0, 0, 0, 0.9], [0.008] * 6][:len(prompts)]

    cfg = load_config(None, ["judge.samples=3", "judge.batch_size=5"])
    found = verdicts(Fake(), "Q={instruction} R={response}", [("a", "b"), ("c", "d")], cfg.judge, 7)
    assert seen == {"prompts": ["Q=a R=b", "Q=c R=d"], "n": 3, "seed": 7, "chat": True}
    assert found[0] == Verdicts(["Score: 4", "Score: 2", "no verdict"], [4.0, 2.0, None], [None, None, "no_score"])
    assert found[0].score == 3.0
    assert found[1].errors == ["out_of_range", "empty", None] and found[1].score == 3.0
    prob = verdicts(Fake(), "{instruction}{response}", [("a", "b"), ("c", "d")],
                    cfg.judge.model_copy(update={"mode": "prob"}), 7)
    assert seen["prefix"] == PROB_PREFIX and seen["batch_size"] == 5
    assert [(v.scores, v.errors, v.score) for v in prob] == [([5.0], [None], 5.0), ([None], ["low_prob_mass"], None)]
    assert prob[0].raw == ['{"probs":[0.0,0.0,0.0,0.0,0.0,1.0],"mass":0.9}']


@pytest.mark.slow  # a tiny model taught the verdict format
def test_expected_score_from_a_real_model_matches_the_hand_computation(backends):
    probs = backends["taught"].choice_probs([_fill(p, "An answer.") for p in PROMPTS], PROB_PREFIX, SCORE_CHOICES,
                                            batch_size=3)
    for p in probs:
        mass = sum(p)
        assert mass >= MIN_PROB_MASS  # taught to say "Score: N": most of the mass is on the digits
        score, _, error = prob_verdict(p)
        assert error is None and 0.0 <= score <= 5.0
        assert score == pytest.approx(sum(i * q for i, q in enumerate(p)) / mass)


def test_compact_template_is_short_and_fills_with_the_two_fields():
    text = open(COMPACT, encoding="utf-8").read()
    filled = text.format(instruction="QQQ", response="RRR")  # no other field: str.format would raise
    assert "QQQ" in filled and "RRR" in filled and len(text.replace("{instruction}", "").split()) < 90
    assert [line[:2] for line in text.splitlines() if line[:1].isdigit()] == ["1.", "2.", "3.", "4.", "5."]
    assert "Score: N" in text.strip().splitlines()[-1]


# --- the judge stage --------------------------------------------------------------------------------------------------
def _stage_config(tmp_path, model, *overrides):
    cfg = load_config(None, [f"registry.root={tmp_path}", "run.device=cpu", "judge.batch_size=2",
                             f"judge.template={COMPACT}", "judge.max_new_tokens=4", *overrides])
    common = dict(run_id="r", iteration=1, config_hash="h", created_at=now())
    with Registry(cfg.registry.root) as reg:
        reg.register_model(model_id="m", name="M1", kind="sft", parent_id=None, path=str(model), stage_run_id="sft",
                           metrics={}, **common)
        for i, (prompt, replies) in enumerate(CANDIDATES.items()):
            reg.insert("prompts", [dict(prompt_id=f"p{i}", source="self_instruct", text=prompt, reference=None,
                                        seed_id=None, few_shot_ids=None, kept=True, drop_reason=None, model_id="m",
                                        stage_run_id="si", **common)])
            reg.insert("candidates", [dict(candidate_id=f"c{i}-{k}", prompt_id=f"p{i}", sample_index=k, text=text,
                                           num_tokens=4, finish_reason="stop", model_id="m", backend="transformers",
                                           sampling={}, seed=0, stage_run_id="gen", **common)
                                      for k, text in enumerate(replies)])
    return cfg


def _judgments(cfg, sid):
    with Registry(cfg.registry.root) as reg:
        return reg.rows("SELECT j.*, p.text AS prompt, c.text AS reply FROM judgments j JOIN candidates c "
                        "USING (candidate_id) JOIN prompts p USING (prompt_id) WHERE j.stage_run_id = ? "
                        "ORDER BY candidate_id, sample_index", [sid])


@pytest.mark.slow  # a tiny model taught the verdict format
@pytest.mark.parametrize("name", ["taught", "random"])
def test_judge_stage_in_prob_mode_writes_one_row_per_candidate(tmp_path, models, backends, name):
    cfg = _stage_config(tmp_path, models[name], "judge.mode=prob", "judge.samples=3")
    result = judge.judge(cfg, "r", 1, "m", "gen")  # 5 candidates in batches of 2
    rows = _judgments(cfg, result.stage_run_id)
    assert [r["candidate_id"] for r in rows] == ["c0-0", "c0-1", "c0-2", "c1-0", "c1-1"]  # one each, not 3
    assert all(r["sample_index"] == 0 for r in rows)
    assert json.loads(rows[0]["sampling"]) == {"mode": "prob", "prefix": "Score:", "choices": SCORE_CHOICES}
    failures = 0
    for r in rows:
        probs = backends[name].choice_probs([_fill(r["prompt"], r["reply"])], PROB_PREFIX, SCORE_CHOICES,
                                            batch_size=1)[0]
        shown = json.loads(r["raw_text"])
        assert shown["mass"] == pytest.approx(sum(probs), abs=1e-5)
        if r["score"] is None:
            failures += 1
            assert r["parse_error"] == "low_prob_mass" and sum(probs) < MIN_PROB_MASS
        else:
            assert r["parse_error"] is None and 0.0 <= r["score"] <= 5.0
            assert r["score"] == pytest.approx(sum(i * p for i, p in enumerate(probs)) / sum(probs), abs=1e-4)
    s = result.stats
    assert (s["samples"], s["candidates"], s["parse_failures"]) == (5, 5, failures)
    assert s["parse_errors"] == ({"low_prob_mass": failures} if failures else {})
    assert s["scored_candidates"] == 5 - failures
    if name == "taught":
        assert failures == 0
    else:  # a random model puts ~2% of its mass on the six digits: every row is a counted failure, no score guessed
        assert failures == 5 and s["mean_score"] is None

    again = judge.judge(cfg, "r", 1, "m", "gen")
    assert again.skipped and again.stage_run_id == result.stage_run_id and again.stats["samples"] == 5
    assert len(_judgments(cfg, result.stage_run_id)) == 5


@pytest.mark.slow  # a tiny model taught the verdict format
def test_judge_stage_mode_is_part_of_its_key_and_sample_mode_keeps_k_samples(tmp_path, models):
    cfg = _stage_config(tmp_path, models["random"], "judge.samples=2")
    sampled = judge.judge(cfg, "r", 1, "m", "gen")
    rows = _judgments(cfg, sampled.stage_run_id)
    assert len(rows) == 10 and {r["sample_index"] for r in rows} == {0, 1}  # 5 candidates x 2, in 3 batches
    assert json.loads(rows[0]["sampling"])["n"] == 2
    prob_cfg = load_config(None, [f"registry.root={tmp_path}", "run.device=cpu", "judge.batch_size=2",
                                  f"judge.template={COMPACT}", "judge.max_new_tokens=4", "judge.samples=2",
                                  "judge.mode=prob"])
    prob = judge.judge(prob_cfg, "r", 1, "m", "gen")
    assert not prob.skipped and prob.stage_run_id != sampled.stage_run_id and prob.stats["samples"] == 5


@pytest.mark.slow  # a tiny model taught the verdict format
def test_judge_stage_resumes_a_half_done_prob_run(tmp_path, models):
    cfg = _stage_config(tmp_path, models["taught"], "judge.mode=prob")
    first = judge.judge(cfg, "r", 1, "m", "gen")
    before = {r["judgment_id"]: (r["score"], r["created_at"]) for r in _judgments(cfg, first.stage_run_id)}
    with Registry(cfg.registry.root) as reg:  # as if killed after the first batch: the rest lost, the stage not done
        keep = sorted(before)[:2]
        reg.con.execute("DELETE FROM judgments WHERE stage_run_id = ? AND judgment_id NOT IN (?, ?)",
                        [first.stage_run_id, *keep])
        reg.con.execute("UPDATE stage_runs SET status = 'running' WHERE stage_run_id = ?", [first.stage_run_id])
    resumed = judge.judge(cfg, "r", 1, "m", "gen")
    after = {r["judgment_id"]: (r["score"], r["created_at"]) for r in _judgments(cfg, first.stage_run_id)}
    assert not resumed.skipped and set(after) == set(before)
    assert all(after[j] == before[j] for j in keep)  # the kept rows were not rewritten
    assert all(after[j][0] == pytest.approx(before[j][0]) for j in before)  # the rest recomputed alike


# --- config check -----------------------------------------------------------------------------------------------------
def test_check_judge_refuses_prob_mode_on_a_backend_without_probabilities(tmp_path):
    cfg = load_config(None, [f"registry.root={tmp_path}", "judge.mode=prob", "generate.backend=openai"])
    with pytest.raises(ConfigError, match=r"judge\.mode=prob .*generate\.backend=transformers.*\(got openai\)"):
        check_judge(cfg)
    with pytest.raises(ConfigError, match=r"judge\.mode"):  # the stage refuses before loading anything
        judge.judge(cfg, "r", 1, "m", "gen")
    check_judge(load_config(None, ["judge.mode=prob"]))  # transformers: fine
    check_judge(load_config(None, ["generate.backend=openai"]))  # sample mode: any backend


# --- eval judge -------------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a tiny model taught the verdict format
def test_eval_judge_in_prob_mode_scores_each_reply_once(models):
    cfg = load_config(None, ["run.device=cpu", "judge.mode=prob", f"judge.template={COMPACT}", "judge.batch_size=8"])
    replies = judge_ranked(cfg, load_seed_data(OASST).ranked, str(models["taught"]))
    ranked = [r for r in replies if r.human_rank is not None]
    assert len(ranked) == 13 and all(len(r.sample_scores) == 1 and r.sample_scores[0] == r.score for r in ranked)
    for r in ranked:
        assert (r.score is None) == (r.errors == ["low_prob_mass"])
        assert r.score is None or 0.0 <= r.score <= 5.0
    report = agreement(by_prompt(replies))
    assert isinstance(report, Agreement) and report.replies == 14 and report.unranked == 1
    assert report.unscored == sum(r.score is None for r in ranked) and report.unscored < 13
    assert report.pairs > 0 and report.agree + report.disagree + report.judge_ties == report.pairs


@pytest.mark.slow  # a tiny model taught the verdict format
def test_eval_judge_cli_in_prob_mode(models, capsys):
    code = main(["eval", "judge", "--data", OASST, "--model", str(models["random"]), "--json", "run.device=cpu",
                 "judge.mode=prob", f"judge.template={COMPACT}", "judge.batch_size=8"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["judge"]["samples_total"] == 13  # one forward pass per ranked reply
    m = result["metrics"]  # a random model: no reply has enough mass on the digits; none is scored, none guessed
    assert m["unscored"] == 13 and m["pairs"] == 0 and result["parse_errors"] == {"low_prob_mass": 13}
