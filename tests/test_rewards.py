"""The coherent reward against a direct token-by-token computation, the rule rewards, the TRL-shaped reward functions,
and the reward stage on a real DuckDB registry (real generate stage, real tiny models)."""

import json

import pytest
import torch

from flywheel.backends.models import build_tokenizer, save_atomically
from flywheel.config import FlywheelConfig, RuleRewardConfig, load_config
from flywheel.registry import Registry, now
from flywheel.signals import (
    RewardError,
    check_same_tokenizer,
    coherent_rewards,
    encode,
    encode_pairs,
    extract_answer,
    make_rule,
    reward_functions,
    reward_weights,
    sequence_logprobs,
)
from flywheel.stages.bootstrap import import_seeds
from flywheel.stages.generate import generate
from flywheel.stages.reward import reward
from tests.helpers.models import seed_tokenizer, tiny_model

PROMPTS = ["What is a noun?", "Name a planet.", "Say hello to the team in one short and friendly sentence, please."]
RESPONSES = ["A noun names a thing.", "Mars", "Hello, team! Have a great day."]


# --- checkers for the python rule, imported by name as tests.test_rewards:<function> ---------------------------------
def contains_reference(prompt, response, reference):
    return float(reference.lower() in response.lower())


def broken_checker(prompt, response, reference):
    raise ZeroDivisionError("checker bug")


def wordy_checker(prompt, response, reference):
    return "not a number"


def noun_allergic_checker(prompt, response, reference):
    if "noun" in prompt:
        raise ValueError("cannot check prompts about nouns")
    return 0.5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_seeds(path, n=8):
    """The first n shipped seeds (seed-001 asks about nouns), as a seed file: a smaller, faster registry."""
    lines = open("seeds/demo.jsonl", encoding="utf-8").read().splitlines()[:n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny():
    """One tokenizer, two different random models sharing it (SFT and PT stand-ins)."""
    tokenizer = seed_tokenizer()
    return tiny_model(tokenizer, 1).eval(), tiny_model(tokenizer, 0).eval(), tokenizer


def direct_logprob(model, tokenizer, prompt, response):
    """Token by token, no batching or padding: the chat-formatted prompt, then each response token and the eos."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    total = 0.0
    with torch.no_grad():
        for tok in target:
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            total += torch.log_softmax(logits.double(), -1)[tok].item()
            ids = ids + [tok]
    return total, len(target)


def test_coherent_reward_equals_direct_per_token_computation(tiny):
    sft, pt, tok = tiny
    got = coherent_rewards(sft, pt, tok, PROMPTS[:2], RESPONSES[:2], batch_size=2, normalize=False, device="cpu")
    for g, p, r in zip(got, PROMPTS, RESPONSES):
        logp_sft, n = direct_logprob(sft, tok, p, r)
        logp_pt, _ = direct_logprob(pt, tok, p, r)
        assert g["tokens"] == n == len(tok(r, add_special_tokens=False)["input_ids"]) + 1
        assert g["logp_sft"] == pytest.approx(logp_sft, abs=1e-3)
        assert g["logp_pt"] == pytest.approx(logp_pt, abs=1e-3)
        assert g["value"] == pytest.approx(logp_sft - logp_pt, abs=2e-3)
        assert abs(g["value"]) > 0.01  # two different models: the test would see a reward of 0


def test_batch_encoding_gives_the_ids_of_one_pair_at_a_time(tiny):
    """encode_pairs (one chat render per distinct prompt, batch tokenizer calls) must give encode's ids exactly."""
    _, _, tok = tiny
    chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}, {"role": "user", "content": PROMPTS[1]}]
    prompts = [PROMPTS[0], PROMPTS[0], chat, PROMPTS[1], chat]
    responses = [RESPONSES[0], "", RESPONSES[1], RESPONSES[0], "Another answer, longer than the others here."]
    assert encode_pairs(tok, prompts, responses) == [encode(tok, p, r) for p, r in zip(prompts, responses)]
    assert encode_pairs(tok, [], []) == []


def test_prompt_is_masked_and_only_conditions(tiny):
    sft, _, tok = tiny
    (lp, n), = sequence_logprobs(sft, tok, [PROMPTS[0]], [RESPONSES[0]], batch_size=1, device="cpu")
    # the whole sequence's log-probability is far lower: the prompt's tokens are not counted
    text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], tokenize=False,
                                   add_generation_prompt=True) + RESPONSES[0]
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    with torch.no_grad():
        full = torch.log_softmax(sft(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum().item()
    assert full < lp - 5
    # a different prompt changes the score of the same response (it conditions), the token count does not change
    (other, n2), = sequence_logprobs(sft, tok, [PROMPTS[1]], [RESPONSES[0]], batch_size=1, device="cpu")
    assert n2 == n and other != pytest.approx(lp, abs=1e-4)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_invariant_to_batch_size_and_padding(tiny, padding_side):
    sft, _, tok = tiny
    tok.padding_side = padding_side
    prompts, responses = PROMPTS * 2, RESPONSES + ["", "x " * 30, "Jupiter is the largest planet."]
    one = sequence_logprobs(sft, tok, prompts, responses, batch_size=1, device="cpu")
    many = sequence_logprobs(sft, tok, prompts, responses, batch_size=4, device="cpu")
    tok.padding_side = "left"
    assert [n for _, n in one] == [n for _, n in many]
    for (a, _), (b, _) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-4)
    assert one[3][1] == 1  # an empty response is scored by its eos alone


def test_normalisation_divides_by_token_count(tiny):
    sft, pt, tok = tiny
    raw = coherent_rewards(sft, pt, tok, PROMPTS, RESPONSES, batch_size=3, normalize=False, device="cpu")
    norm = coherent_rewards(sft, pt, tok, PROMPTS, RESPONSES, batch_size=3, normalize=True, device="cpu")
    for r, n in zip(raw, norm):
        assert n["value"] == pytest.approx(r["value"] / r["tokens"], rel=1e-6)
        assert n["tokens"] == r["tokens"] > 1


def test_too_long_is_an_error_value_not_a_crash(tiny):
    sft, pt, tok = tiny
    out = coherent_rewards(sft, pt, tok, ["Hi", "Hi"], ["ok", "word " * 600], batch_size=2, normalize=False,
                           device="cpu")
    assert out[0]["value"] is not None and out[1]["value"] is None and "context" in out[1]["error"]


def test_different_tokenizers_are_refused(tiny):
    sft, pt, tok = tiny
    other = build_tokenizer(["some other text entirely"] * 4, 300)
    with pytest.raises(RewardError, match="tokenizers differ \\(vocabulary\\)"):
        check_same_tokenizer(tok, other)
    check_same_tokenizer(tok, tok)
    small = tiny_model(other, 0)
    with pytest.raises(RewardError, match="vocabulary"):
        coherent_rewards(sft, small, tok, PROMPTS, RESPONSES, batch_size=2, normalize=False, device="cpu")


# --- rules ------------------------------------------------------------------------------------------------------------
def rule(**kw):
    return make_rule(RuleRewardConfig(name=kw.pop("name", "r"), **kw))


def test_exact_rule_extracts_the_final_answer():
    exact = rule(kind="exact")
    assert extract_answer("Let me think.\nAnswer: 42.") == "42."
    assert exact("q", "Let me think.\n answer:   Paris  \nThanks", "paris") == (1.0, {"answer": "Paris"})
    assert exact("q", "First 3, then 4.\nThe Answer:  New   York.", "new york")[0] == 1.0  # the last Answer:
    assert exact("q", "Working...\n\n  The  Result  \n", "the result")[0] == 1.0  # no Answer: -> last line
    assert exact("q", "Answer:\n42", "42")[0] == 1.0  # empty after Answer: -> last line
    assert exact("q", "Answer: 41", "42") == (0.0, {"answer": "41"})
    with pytest.raises(RewardError, match="rule 'r'.*no reference"):
        exact("q", "Answer: 41", None)


def test_regex_rule():
    grouped = rule(kind="regex", pattern=r"####\s*(-?\d+)")
    assert grouped("q", "so 3 + 4 = 7\n#### 7", "7") == (1.0, {"answer": "7"})
    assert grouped("q", "#### 5 ... no wait #### 8", "8")[0] == 1.0  # the last match
    assert grouped("q", "#### 9", "7")[0] == 0.0
    assert grouped("q", "no marker here", "7") == (0.0, {"answer": None})
    whole = rule(kind="regex", pattern=r"\b[A-E]\b")
    assert whole("q", "I pick C", "c")[0] == 1.0
    with pytest.raises(RewardError, match="rule 'bad'.*not a valid regex"):
        rule(name="bad", kind="regex", pattern="(unclosed")


def test_python_rule_and_its_errors():
    ok = rule(kind="python", checker="tests.test_rewards:contains_reference")
    assert ok("q", "The capital is Paris", "paris") == (1.0, {})
    assert ok("q", "The capital is Rome", "paris") == (0.0, {})
    with pytest.raises(RewardError, match="rule 'nomod'.*cannot import module 'no_such_module_xyz'"):
        rule(name="nomod", kind="python", checker="no_such_module_xyz:f")
    with pytest.raises(RewardError, match="rule 'nofn'.*no function 'missing'"):
        rule(name="nofn", kind="python", checker="tests.test_rewards:missing")
    with pytest.raises(RewardError, match="rule 'form'.*not of the form"):
        rule(name="form", kind="python", checker="tests.test_rewards")
    with pytest.raises(RewardError, match="rule 'boom'.*broken_checker raised ZeroDivisionError: checker bug"):
        rule(name="boom", kind="python", checker="tests.test_rewards:broken_checker")("q", "r", "x")
    with pytest.raises(RewardError, match="rule 'words'.*returned 'not a number'"):
        rule(name="words", kind="python", checker="tests.test_rewards:wordy_checker")("q", "r", "x")


def test_a_checker_named_by_its_module_path_before_the_layout_still_resolves():
    """Configs written before flywheel/ had subpackages name `flywheel.miniworld:exact_match`; it now lives in
    flywheel.analysis.miniworld, and both names give the same checker."""
    old = rule(name="old", kind="python", checker="flywheel.miniworld:exact_match")
    new = rule(name="new", kind="python", checker="flywheel.analysis.miniworld:exact_match")
    right, wrong = ("123", "123"), ("321", "123")
    assert old("q", *right) == new("q", *right) == (1.0, {})
    assert old("q", *wrong) == new("q", *wrong) == (0.0, {})


# --- TRL-shaped reward functions --------------------------------------------------------------------------------------
def test_reward_functions_for_trl(tiny):
    sft, pt, tok = tiny
    cfg = FlywheelConfig.model_validate({"reward": {
        "coherent": True, "rules": [{"name": "exact", "kind": "exact"},
                                    {"name": "unused", "kind": "regex", "pattern": "x"}],
        "weights": {"judge": 1.0, "coherent": 0.5, "exact": 2.0}}})
    funcs = reward_functions(cfg, sft, pt, tok, "cpu")
    assert [f.__name__ for f in funcs] == ["coherent", "exact"]  # 'unused' has no weight, the judge is not online
    assert reward_weights(cfg) == [0.5, 2.0]
    coherent, exact = funcs
    expected = [r["value"] for r in coherent_rewards(sft, pt, tok, PROMPTS, RESPONSES, batch_size=16, normalize=False,
                                                     device="cpu")]
    conversational = coherent([[{"role": "user", "content": p}] for p in PROMPTS],
                              [[{"role": "assistant", "content": r}] for r in RESPONSES])
    assert conversational == pytest.approx(expected, abs=1e-4)
    assert coherent(PROMPTS, RESPONSES) == pytest.approx(expected, abs=1e-4)
    assert exact(PROMPTS, ["Answer: Mars", "Answer: Mars", "x"], reference=["mars", "venus", None]) == [1.0, 0.0, None]
    with pytest.raises(RewardError, match="'exact' needs a 'reference' column"):
        exact(PROMPTS, RESPONSES)
    # no online signal weighted (the default judge-only config): the coherent reward alone, as SRPPO
    (alone,) = reward_functions(FlywheelConfig(), sft, pt, tok, "cpu")
    assert alone.__name__ == "coherent" and reward_weights(FlywheelConfig()) == [1.0]


# --- the reward stage -------------------------------------------------------------------------------------------------
@pytest.mark.slow  # the generate and reward stages on tiny models
def test_reward_stage_one_row_per_candidate_and_signal_and_rerun_is_a_no_op(tmp_path, tiny, monkeypatch):
    sft, pt, tok = tiny
    overrides = [f"registry.root={tmp_path / 'reg'}", f"seeds.path={small_seeds(tmp_path / 'seeds.jsonl')}",
                 "run.device=cpu", "reward.batch_size=4", "generate.n=2", "generate.max_new_tokens=12",
                 "reward.coherent=true",
                 "reward.rules=[{name: exact, kind: exact}, {name: picky, kind: python, "
                 "checker: 'tests.test_rewards:noun_allergic_checker'}]"]
    cfg = load_config(None, overrides)
    seeds = import_seeds(cfg, "run")
    save_atomically(sft, tok, tmp_path / "sft")
    save_atomically(pt, tok, tmp_path / "pt")
    with Registry(cfg.registry.root) as reg:
        for mid, name in (("m-sft", "M1"), ("m-pt", "PT")):
            reg.register_model(model_id=mid, run_id="run", name=name, kind="sft", iteration=0, parent_id=None,
                               path=str(tmp_path / mid.removeprefix("m-")), stage_run_id="test", config_hash="h",
                               created_at=now())
    gen = generate(cfg, "run", 1, "m-sft", seeds.stage_run_id)

    result = reward(cfg, "run", 1, gen.stage_run_id, "m-sft", "m-pt")
    n = gen.stats["candidates"]
    assert n == 16 and not result.skipped
    with Registry(cfg.registry.root) as reg:
        rows = reg.rows("SELECT r.*, c.text AS response, p.text AS prompt FROM rewards r JOIN candidates c "
                        "USING (candidate_id) JOIN prompts p USING (prompt_id) ORDER BY r.reward_id")
    assert len(rows) == 3 * n
    assert {(r["candidate_id"], r["signal"]) for r in rows} == {
        (c, s) for c in {r["candidate_id"] for r in rows} for s in ("coherent", "exact", "picky")}
    coh = [r for r in rows if r["signal"] == "coherent"]
    assert all(r["policy_model_id"] == "m-sft" and r["ref_model_id"] == "m-pt" and r["error"] is None for r in coh)
    again = coherent_rewards(sft, pt, tok, [r["prompt"] for r in coh[:5]], [r["response"] for r in coh[:5]],
                             batch_size=5, normalize=False, device="cpu")
    for r, a in zip(coh, again):
        assert r["value"] == pytest.approx(a["value"], abs=1e-3)
        assert json.loads(r["details"])["tokens"] == a["tokens"]
    picky = [r for r in rows if r["signal"] == "picky"]
    failed = [r for r in picky if r["value"] is None]
    assert len(failed) == sum("noun" in r["prompt"] for r in picky) > 0
    assert all("rule 'picky'" in r["error"] and "cannot check prompts about nouns" in r["error"] for r in failed)
    assert result.stats["signals"]["picky"] == {"count": n, "mean": 0.5, "failures": len(failed)}
    assert result.stats["signals"]["coherent"]["failures"] == 0
    mean = sum(r["value"] for r in coh) / n
    assert result.stats["signals"]["coherent"]["mean"] == pytest.approx(mean, abs=1e-3)

    # a second call is skipped by the ledger; a resumed one finds every batch committed and loads no model
    assert reward(cfg, "run", 1, gen.stage_run_id, "m-sft", "m-pt").skipped
    with Registry(cfg.registry.root) as reg:
        reg.con.execute("UPDATE stage_runs SET status = 'running' WHERE stage = 'reward'")

    def no_load(*a, **k):
        raise AssertionError("a finished reward stage loaded a model")

    monkeypatch.setattr("flywheel.stages.reward.load", no_load)
    resumed = reward(cfg, "run", 1, gen.stage_run_id, "m-sft", "m-pt")
    assert not resumed.skipped and resumed.stats["signals"] == result.stats["signals"]
    with Registry(cfg.registry.root) as reg:
        assert reg.scalar("SELECT count(*) FROM rewards") == 3 * n
