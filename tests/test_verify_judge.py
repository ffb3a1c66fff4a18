"""Verification-style judging (`judge.mode: verify`): one yes/no question per requirement of the prompt
(`judge.checklist`, given the prompt and its reference), the score 5 x the mean P(yes); checklist failures counted,
never a crash; config errors named before work; the other modes' stage ids as they were; the IF world's checklist.
A tiny random Llama whose tokenizer has " yes", " Yes", " no" and " No" as tokens of their own."""

import json
import re

import pytest

from flywheel.analysis.ifworld import IFWorld, IFWorldSizes, checklist
from flywheel.backends import TransformersBackend, release_backends
from flywheel.backends.models import build_tokenizer, save_atomically
from flywheel.config import ConfigError, load_config
from flywheel.pipeline import preflight
from flywheel.registry import Registry, now
from flywheel.stage import stage_run_id
from flywheel.stages import judge
from flywheel.stages.judge import (
    GENERIC_REQUIREMENT,
    MIN_PROB_MASS,
    VERIFY_CHOICES,
    VERIFY_PREFIX,
    check_judge,
    judge_inputs,
    judge_template_path,
    load_checklist,
    read_judge_template,
    verdicts,
    verify_verdict,
)
from flywheel.stages.seeds import load_seeds, pretrain_corpus
from tests.helpers import REPO
from tests.helpers.models import tiny_model
from tests.helpers.registry import candidate_row, prompt_row

HERE = "tests.test_verify_judge"
# prompt -> (its reference, its candidates' texts); the reference is what `listed` reads the requirements from
PROMPTS = {
    "What is a noun?": ('{"checks": ["Names a part of speech.", "Is one sentence."]}',
                        ["A word that names a thing.", "Blue.", "A noun names a person, place or thing."]),
    "List three colours.": ('{"checks": ["Lists three colours."]}', ["Red, green, blue.", "I like cake."]),
    "Say hello.": (None, ["Hello."]),
}
SEEN: list[tuple] = []  # (prompt, reference) of each call to `listed`


def listed(prompt, reference):
    """A checklist: the reference's "checks", or the generic requirement when there is no reference."""
    SEEN.append((prompt, reference))
    return json.loads(reference)["checks"] if reference else [GENERIC_REQUIREMENT]


def flaky(prompt, reference):
    """A checklist that raises for one prompt, has nothing for another, and works for the rest."""
    if "colours" in prompt:
        raise KeyError("no checks for colours")
    if reference is None:
        return []
    return json.loads(reference)["checks"]


@pytest.fixture(scope="module", autouse=True)
def _release(one_torch_thread):
    yield
    release_backends()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A random tiny Llama; its tokenizer is trained on the seeds plus a few yes/no lines, so the four choices each
    begin with a token of their own after a space (as in real chat tokenizers)."""
    corpus = pretrain_corpus(load_seeds(REPO / "seeds/demo.jsonl"), [], 0)
    tok = build_tokenizer(corpus + ["Answer: yes. Answer: Yes. Answer: no. Answer: No."] * 50, 512)
    path = tmp_path_factory.mktemp("verify") / "tiny"
    save_atomically(tiny_model(tok), tok, path)
    return path


def _config(tmp_path, *overrides):
    return load_config(None, [f"registry.root={tmp_path}", "run.device=cpu", "judge.batch_size=2",
                              "judge.mode=verify", *overrides])


def _register(cfg, model_path):
    common = dict(run_id="r", iteration=1, config_hash="h", created_at=now())
    with Registry(cfg.registry.root) as reg:
        reg.register_model(model_id="m", name="M1", kind="sft", parent_id=None, path=str(model_path),
                           stage_run_id="sft", metrics={}, **common)
        for i, (prompt, (reference, replies)) in enumerate(PROMPTS.items()):
            reg.insert("prompts", [prompt_row(f"p{i}", prompt, "si", reference=reference)])
            reg.insert("candidates", [candidate_row(f"c{i}-{k}", f"p{i}", text, "gen", sample_index=k, num_tokens=4)
                                      for k, text in enumerate(replies)])


def _judgments(cfg, sid):
    with Registry(cfg.registry.root) as reg:
        return reg.rows("SELECT j.*, p.text AS prompt, p.reference, c.text AS reply FROM judgments j "
                        "JOIN candidates c USING (candidate_id) JOIN prompts p USING (prompt_id) "
                        "WHERE j.stage_run_id = ? ORDER BY candidate_id, sample_index", [sid])


# --- the verdict ------------------------------------------------------------------------------------------------------
def test_verify_verdict_is_five_times_the_mean_yes_share_of_the_requirements_with_mass():
    # choices: yes, Yes, no, No
    score, raw, error = verify_verdict([[0.3, 0.1, 0.1, 0.0], [0.0, 0.05, 0.1, 0.1]])
    assert error is None and score == pytest.approx(5 * (0.4 / 0.5 + 0.05 / 0.25) / 2)
    assert json.loads(raw) == {"yes": [0.8, 0.2], "mass": [0.5, 0.25]}
    # a requirement with too little mass on yes + no is left out of the mean, and shown
    score, raw, error = verify_verdict([[0.6, 0.0, 0.2, 0.0], [0.01, 0.0, 0.0, 0.0]])
    assert error is None and score == pytest.approx(5 * 0.75) and json.loads(raw)["mass"][1] == 0.01
    score, raw, error = verify_verdict([[0.01, 0.0, 0.01, 0.0], [0.0] * 4])  # none with enough: never guessed
    assert (score, error) == (None, "low_prob_mass") and json.loads(raw)["yes"] == [0.5, 0.0]
    with pytest.raises(ValueError, match="expected 4 probabilities"):
        verify_verdict([[0.5, 0.5]])


class Fake:
    """A backend that answers choice_probs with fixed rows and remembers what it was asked."""

    def __init__(self, rows):
        self.rows, self.seen = rows, {}

    def choice_probs(self, prompts, prefix, choices, *, batch_size):
        self.seen.update(prompts=prompts, prefix=prefix, choices=choices, batch_size=batch_size)
        return [self.rows[i % len(self.rows)] for i in range(len(prompts))]


def test_verdicts_in_verify_mode_take_pairs_or_triples_and_ask_one_question_per_requirement():
    c = _config("/tmp/unused", f"judge.checklist={HERE}:listed").judge
    template = "Q={instruction} R={response} N={requirement}"
    fake = Fake([[0.4, 0.0, 0.1, 0.0]])
    SEEN.clear()
    found = verdicts(fake, template, [("q1", "a1", '{"checks": ["x", "y"]}'), ("q2", "a2")], c, seed=0)
    assert fake.seen == {"prompts": ["Q=q1 R=a1 N=x", "Q=q1 R=a1 N=y", f"Q=q2 R=a2 N={GENERIC_REQUIREMENT}"],
                         "prefix": VERIFY_PREFIX, "choices": VERIFY_CHOICES, "batch_size": 2}
    assert SEEN == [("q1", '{"checks": ["x", "y"]}'), ("q2", None)]  # a pair has no reference
    assert [(v.scores, v.errors) for v in found] == [([pytest.approx(4.0)], [None]), ([pytest.approx(4.0)], [None])]
    assert json.loads(found[0].raw[0]) == {"yes": [0.8, 0.8], "mass": [0.5, 0.5]}
    # no checklist: the generic requirement, one question per item
    generic = verdicts(fake, template, [("q", "a")], c.model_copy(update={"checklist": None}), seed=0)
    assert fake.seen["prompts"] == [f"Q=q R=a N={GENERIC_REQUIREMENT}"] and generic[0].score == pytest.approx(4.0)
    # the holistic template given by mistake: refused, naming the field, before any pass
    fake.seen.clear()
    with pytest.raises(ConfigError, match=r"judge\.verify_template.*\{requirement\}"):
        verdicts(fake, "Q={instruction} R={response}", [("q", "a")], c, seed=0)
    assert fake.seen == {}


def test_a_failing_checklist_is_that_items_verdict_in_verdicts():
    c = _config("/tmp/unused", f"judge.checklist={HERE}:flaky").judge
    fake = Fake([[0.0, 0.3, 0.0, 0.1]])
    found = verdicts(fake, read_judge_template(c), [("List three colours.", "a", None), ("Say hello.", "b", None),
                                                   ("q", "c", '{"checks": ["x"]}')], c, seed=0)
    assert [v.errors for v in found] == [["checklist_error"], ["checklist_empty"], [None]]
    assert [v.score for v in found][:2] == [None, None] and found[2].score == pytest.approx(5 * 0.75)
    assert "KeyError" in json.loads(found[0].raw[0])["error"] and len(fake.seen["prompts"]) == 1


# --- the judge stage --------------------------------------------------------------------------------------------------
def test_judge_stage_in_verify_mode_writes_one_row_per_candidate(tmp_path, model_path, monkeypatch):
    """A random model puts little mass on yes/no: with the floor at 0 every row is scored, each 5 x the mean of its
    stored yes shares, which match a direct pass on the filled template."""
    monkeypatch.setattr(judge, "MIN_PROB_MASS", 0.0)
    cfg = _config(tmp_path, f"judge.checklist={HERE}:listed", "judge.samples=3")
    _register(cfg, model_path)
    SEEN.clear()
    result = judge.judge(cfg, "r", 1, "m", "gen")  # 6 candidates in batches of 2
    rows = _judgments(cfg, result.stage_run_id)
    assert [r["candidate_id"] for r in rows] == ["c0-0", "c0-1", "c0-2", "c1-0", "c1-1", "c2-0"]  # one each, not 3
    assert all(r["sample_index"] == 0 and r["parse_error"] is None for r in rows)
    assert json.loads(rows[0]["sampling"]) == {"mode": "verify", "prefix": "Answer:", "choices": VERIFY_CHOICES,
                                               "checklist": f"{HERE}:listed"}
    assert set(SEEN) == {(p, ref) for p, (ref, _) in PROMPTS.items()}  # the checklist got each prompt's reference
    backend = TransformersBackend(str(model_path), "cpu")
    template = read_judge_template(cfg.judge)
    for r in rows:
        shown = json.loads(r["raw_text"])
        reqs = listed(r["prompt"], r["reference"])
        assert len(shown["yes"]) == len(shown["mass"]) == len(reqs)
        assert 0.0 <= r["score"] <= 5.0 and r["score"] == pytest.approx(5 * sum(shown["yes"]) / len(reqs), abs=1e-5)
        direct = backend.choice_probs([template.format(instruction=r["prompt"], response=r["reply"], requirement=q)
                                       for q in reqs], VERIFY_PREFIX, VERIFY_CHOICES, batch_size=4)
        assert shown["mass"] == pytest.approx([sum(p) for p in direct], abs=1e-5)
        assert shown["yes"] == pytest.approx([(p[0] + p[1]) / sum(p) for p in direct], abs=1e-5)
    s = result.stats
    assert (s["samples"], s["candidates"], s["parse_failures"], s["scored_candidates"]) == (6, 6, 0, 6)
    with Registry(cfg.registry.root) as reg:  # the verify template is the one registered and recorded
        h = reg.scalar("SELECT DISTINCT template_hash FROM judgments WHERE stage_run_id = ?", [result.stage_run_id])
    assert result.stage_run_id == stage_run_id("judge", judge_inputs(cfg, "m", "gen", h))
    again = judge.judge(cfg, "r", 1, "m", "gen")
    assert again.skipped and again.stage_run_id == result.stage_run_id


def test_judge_stage_counts_checklist_failures_and_low_mass_without_crashing(tmp_path, model_path):
    cfg = _config(tmp_path, f"judge.checklist={HERE}:flaky")
    _register(cfg, model_path)
    result = judge.judge(cfg, "r", 1, "m", "gen")
    rows = {r["candidate_id"]: r for r in _judgments(cfg, result.stage_run_id)}
    assert len(rows) == 6 and all(r["score"] is None for r in rows.values())
    assert {rows[c]["parse_error"] for c in ("c1-0", "c1-1")} == {"checklist_error"}  # it raised
    assert "KeyError" in json.loads(rows["c1-0"]["raw_text"])["error"]
    assert rows["c2-0"]["parse_error"] == "checklist_empty"
    # a random model's mass on yes/no is under the floor: counted, not guessed
    for c in ("c0-0", "c0-1", "c0-2"):
        shown = json.loads(rows[c]["raw_text"])
        assert rows[c]["parse_error"] == "low_prob_mass" and max(shown["mass"]) < MIN_PROB_MASS
    s = result.stats
    assert s["parse_errors"] == {"checklist_empty": 1, "checklist_error": 2, "low_prob_mass": 3}
    assert (s["samples"], s["parse_failures"], s["scored_candidates"], s["mean_score"]) == (6, 6, 0, None)
    with Registry(cfg.registry.root) as reg:
        assert reg.scalar("SELECT status FROM stage_runs WHERE stage_run_id = ?", [result.stage_run_id]) == "done"


# --- config -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, words", [
    (["generate.backend=openai"], [r"judge\.mode=verify", r"generate\.backend=transformers", r"\(got openai\)"]),
    (["judge.checklist=no.such.module:f"], [r"judge\.checklist", "cannot import module 'no.such.module'"]),
    (["judge.checklist=flywheel.analysis.ifworld:nope"], [r"judge\.checklist", "no function 'nope'"]),
    (["judge.checklist=flywheel.analysis.ifworld"], [r"judge\.checklist", "'module:function'"]),
])
def test_check_judge_refuses_what_verify_mode_cannot_run_naming_the_field(tmp_path, overrides, words):
    cfg = _config(tmp_path, *overrides)
    for call in (lambda: check_judge(cfg), lambda: judge.judge(cfg, "r", 1, "m", "gen"), lambda: preflight(cfg)):
        with pytest.raises(ConfigError) as e:
            call()
        assert all(re.search(w, str(e.value)) for w in words), str(e.value)
    assert not any(tmp_path.iterdir())  # refused before the registry was even opened


def test_check_judge_refuses_a_verify_template_without_its_fields(tmp_path):
    path = tmp_path / "verify.txt"
    path.write_text("Request: {instruction}\nReply: {response}\nAnswer yes or no.\n")
    with pytest.raises(ConfigError, match=r"judge\.verify_template: .* has no \{requirement\} field"):
        check_judge(_config(tmp_path, f"judge.verify_template={path}"))
    path.write_text("Request: {instruction}\nReply: {response}\nRule: {requirement} {score}\n")
    with pytest.raises(ConfigError, match=r"judge\.verify_template: .*\{score\} is not one this stage fills in"):
        check_judge(_config(tmp_path, f"judge.verify_template={path}"))
    with pytest.raises(ConfigError, match=r"judge\.verify_template: template file not found"):
        check_judge(_config(tmp_path, f"judge.verify_template={tmp_path / 'missing.txt'}"))
    # the shipped one passes; the holistic template is still checked (M1's EFT fills it in every mode)
    check_judge(_config(tmp_path, "judge.checklist=flywheel.analysis.ifworld:checklist"))
    with pytest.raises(ConfigError, match=r"judge\.template"):
        check_judge(_config(tmp_path, f"judge.template={path}"))
    assert judge_template_path(_config(tmp_path).judge) == REPO / "prompts/verify.txt"
    assert judge_template_path(load_config(None, []).judge) == REPO / "prompts/judge.txt"


def test_other_modes_keep_their_stage_ids():
    """The ids the judge stage had before verify mode existed (default config, model m, candidates gen, template
    hash t); verify mode's settings change them only in verify mode."""
    expected = {"sample": "judge-f9abe1b1161e2101", "prob": "judge-62f3bc8f3aac0f7e"}
    for mode, sid in expected.items():
        for extra in ([], ["judge.checklist=flywheel.analysis.ifworld:checklist", "judge.verify_template=x.txt"]):
            cfg = load_config(None, [f"judge.mode={mode}", *extra])
            assert stage_run_id("judge", judge_inputs(cfg, "m", "gen", "t")) == sid
    verify = load_config(None, ["judge.mode=verify"])
    listing = load_config(None, ["judge.mode=verify", f"judge.checklist={HERE}:listed"])
    ids = {stage_run_id("judge", judge_inputs(c, "m", "gen", t))
           for c, t in [(verify, "t"), (verify, "t2"), (listing, "t")]}
    assert len(ids) == 3 and not ids & set(expected.values())


# --- the IF world's checklist -----------------------------------------------------------------------------------------
def test_ifworld_checklist_gives_one_text_per_instruction_as_the_prompt_states_it(tmp_path):
    files = IFWorld(IFWorldSizes(seeds=2, pool=3, test=1), seed=0).write(tmp_path)
    pool = [json.loads(line) for line in files["pool"].read_text().splitlines()]
    assert len(pool) == 3
    for row in pool:
        ids = json.loads(row["reference"])["instruction_id_list"]
        texts = checklist(row["prompt"], row["reference"])
        assert len(texts) == len(ids) and all(t.strip() and t in row["prompt"] for t in texts)
    assert load_checklist("flywheel.analysis.ifworld:checklist") is checklist
    with pytest.raises(ValueError, match="reference"):
        checklist("a prompt with no reference", None)
