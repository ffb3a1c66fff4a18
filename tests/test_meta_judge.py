"""The meta-judge (Meta-Rewarding): M_t compares the best- and worst-scored of its own judge samples of a candidate, in
both orders; agreed verdicts are judge-preference pairs, frozen as a dataset version, that DPO trains on beside the
actor pairs. Judge samples written by hand on a real registry and a fake backend whose verdicts are chosen per
candidate (as test_judge_prob's), so every pair is known; one test on the real tiny model for the counted failures."""

import random
import re

import pytest

import flywheel.stages.meta_judge as meta_stage
import flywheel.training.dpo as dpo
from flywheel import pipeline
from flywheel.analysis import report
from flywheel.backends import Generation, release_backends
from flywheel.config import ConfigError, content_hash, load_config
from flywheel.registry import Registry
from flywheel.registry.datasets import DATASET_SQL, freeze_dataset, read_version, stage_version
from flywheel.stage import IterationState, StageContext, stage_run_id
from flywheel.stages.judge import fill
from flywheel.stages.meta_judge import meta_judge, parse_verdict
from flywheel.stages.pairs import build_pairs
from tests.helpers.registry import candidate_row, insert_rows, judgment_row, prompt_row

JUDGE_SID = "judge-test"
# A judge template with literal braces, and a prompt holding "{response}": the frozen prompt must be str.format's.
JUDGE_TEMPLATE = "Rate {{0-5}} the reply.\nQ: {instruction}\nA: {response}\nEnd with }} Score: N"
# prompt -> candidate -> judge sample scores (None: a parse failure)
SCORES = {"p1": {"c1": [4, 2, None], "c2": [3, 3, 3]},   # c1: 4 vs 2; c2 ties: no contrast
          "p2": {"c3": [5, None, None], "c4": [1, 5, 5]},  # c3: one valid sample; c4: the first 5 vs the 1
          "p3": {"c5": [0, 2, 2], "c6": [2, 4, 2]}}        # c5: 2 (sample 1) vs 0; c6: 4 vs 2 (sample 0)
PROMPTS = {"p1": "question p1 {response}", "p2": "question p2", "p3": "question p3"}


def verdict_for(candidate: str, a: str, b: str) -> str:
    """The fake meta-judge's reply, given the judgments shown as A and B: c1 prefers its lower-scored judgment, c4
    its higher in both orders; c5 always says A (position bias); c6 gives no verdict once."""
    if candidate == "c1":
        return "A is closer to the rubric.\nBetter: A" if a == "c1-1" else "Better: B"
    if candidate == "c4":
        return "Better judgment: **A**" if a == "c4-1" else "B is right.\nVerdict = B."
    if candidate == "c5":
        return "Better: A"
    return "Better: B" if a == "c6-0" else "Both are fine."


class Fake:
    """A backend whose replies are `verdict_for` each prompt; it remembers each call."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def generate(self, prompts, params, *, seed, chat):
        self.calls.append(dict(prompts=prompts, n=params.n, seed=seed, chat=chat))
        if len(self.calls) == self.fail_at:
            raise RuntimeError("killed")
        out = []
        for p in prompts:
            a, b = re.findall(r"\[(c\d-\d)\]", p)
            out.append([Generation(verdict_for(re.search(r"answer (c\d)", p).group(1), a, b), 3, "stop")])
        return out


def _config(root, *overrides):
    return load_config(None, [f"registry.root={root}", "run.device=cpu", "meta_judge.enabled=true",
                              "meta_judge.batch_size=2", *overrides])


def _registry(root, model_dir=None):
    """The prompts, candidates and judge samples of SCORES (raw text "[<judgment id>] ... Score: N"), the judge
    template, and model "m" (M_t) with its folder."""
    with Registry(root) as reg:
        reg.register_template(content_hash(JUDGE_TEMPLATE), "judge", JUDGE_TEMPLATE)
        prompts, cands, judgments = [], [], []
        for p, by_candidate in SCORES.items():
            prompts.append(prompt_row(p, PROMPTS[p], "si"))
            for c, samples in by_candidate.items():
                cands.append(candidate_row(c, p, f"answer {c}", "gen"))
                judgments += [judgment_row(c, k, s, JUDGE_SID, template_hash=content_hash(JUDGE_TEMPLATE),
                                           raw_text=f"[{c}-{k}] Looks {'fine' if s else 'odd'}. Score: {s}")
                              for k, s in enumerate(samples)]
        for table, rows in (("prompts", prompts), ("candidates", cands), ("judgments", judgments)):
            insert_rows(reg, table, rows)
        folder = model_dir or root / "m"
        folder.mkdir(parents=True, exist_ok=True)
        reg.register_model(model_id="m", run_id="r", name="M1", kind="sft", iteration=0, parent_id=None,
                           path=str(folder), stage_run_id="sft-x", config_hash="h")


def _run(cfg, monkeypatch, fake=None):
    fake = fake or Fake()
    monkeypatch.setattr(meta_stage, "backend_for", lambda *a: fake)
    return meta_judge(cfg, "r", 1, "m", JUDGE_SID), fake


# --- the verdict ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, found", [
    ("Judgment B misses the point.\nBetter: A", ("A", None)), ("Better judgement: **B**", ("B", None)),
    ("winner = (A)", ("A", None)), ("Verdict: Judgment B", ("B", None)), (" B. ", ("B", None)),
    ("Better: A\nOn reflection, Better: B", ("B", None)),        # the last verdict counts
    ("Better: a clear call", (None, "no_verdict")),              # a lower-case word, not a verdict
    ("Both are good.", (None, "no_verdict")), ("  ", (None, "empty")),
])
def test_parse_verdict_reads_the_last_better_line_or_a_bare_letter(text, found):
    assert parse_verdict(text) == found


# --- the stage --------------------------------------------------------------------------------------------------------
def _empty_iteration() -> dict:
    """An iteration's figures as the report holds them when no stage wrote anything."""
    return {"prompts_made": None, "judge_samples": None, "margin": None, "unpaired": {}, "distinct_1": None,
            "rewards": {}, "training": {}}


def test_pairs_come_from_contrasting_samples_whose_two_verdicts_agree(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    _registry(tmp_path)
    result, fake = _run(cfg, monkeypatch)
    # asked about c1, c4, c5, c6 (the candidates with two valid samples that differ), both orders, 2 per batch
    sent = [p for call in fake.calls for p in call["prompts"]]
    shown = [tuple(re.findall(r"\[(c\d-\d)\]", p)) for p in sent]
    assert shown == [("c1-0", "c1-1"), ("c1-1", "c1-0"), ("c4-1", "c4-0"), ("c4-0", "c4-1"),
                     ("c5-1", "c5-0"), ("c5-0", "c5-1"), ("c6-1", "c6-0"), ("c6-0", "c6-1")]
    assert all(c["n"] == 1 and c["chat"] for c in fake.calls) and len(fake.calls) == 2
    assert len({c["seed"] for c in fake.calls}) == 2  # a seed per batch
    template = cfg.meta_judge.template.read_text()
    assert sent[0] == template.format(instruction=PROMPTS["p1"], response="answer c1",
                                      judgment_a="[c1-0] Looks fine. Score: 4", judgment_b="[c1-1] Looks fine. Score: 2")
    s = result.stats
    assert (s["contrasts"], s["verdicts"], s["parse_failures"], s["judge_pairs"], s["position_bias"],
            s["higher_preferred"]) == (4, 8, 1, 2, 1, 1)
    with Registry(cfg.registry.root) as reg:  # the report shows the same figures
        figures = report._meta_judge(reg, result.stage_run_id)["meta_judge"]
        assert report._meta_judge(reg, None) == {}
    assert figures == {k: s[k] for k in figures}
    line = next(x for x in report.detail_lines({**_empty_iteration(), "meta_judge": figures}) if "meta-judge" in x)
    assert "4 candidates with contrasting judgments, 8 verdicts (1 unparsed), 2 judge-preference pairs" in line

    with Registry(cfg.registry.root) as reg:
        vid = stage_version(reg, result.stage_run_id, "judge_pairs")
        rows = read_version(reg, vid).to_pylist()
        failed = reg.rows("SELECT candidate_id, sample_index, raw_text, score, parse_error FROM judgments "
                          "WHERE stage_run_id = ? AND score IS NULL", [result.stage_run_id])
    assert [(r["candidate_id"], r["chosen_judgment_id"], r["rejected_judgment_id"]) for r in rows] == [
        ("c1", "c1-1", "c1-0"), ("c4", "c4-1", "c4-0")]  # the meta-judge may side with the lower-scored judgment
    c1, c4 = rows
    assert c1["prompt"] == fill(JUDGE_TEMPLATE, PROMPTS["p1"], "answer c1")  # exactly what the judge saw
    assert c1["prompt"].startswith("Rate {0-5} the reply.\nQ: question p1 {response}\nA: answer c1")
    assert (c1["chosen"], c1["rejected"]) == ("[c1-1] Looks fine. Score: 2", "[c1-0] Looks fine. Score: 4")
    assert (c1["chosen_score"], c1["rejected_score"]) == (2.0, 4.0)
    assert (c4["verdict_ab"], c4["verdict_ba"]) == ("Better judgment: **A**", "B is right.\nVerdict = B.")
    assert failed == [dict(candidate_id="c6", sample_index=0, raw_text="Both are fine.", score=None,
                           parse_error="no_verdict")]
    with Registry(cfg.registry.root) as reg:  # the version is what its SQL gives from the registry rows: restorable
        assert freeze_dataset(reg, "judge_pairs", result.stage_run_id, run_id="r", iteration=1, derived_from=[],
                              config_hash="h") == vid
        assert reg.rows(DATASET_SQL["judge_pairs"], {"sid": result.stage_run_id}) == rows

    again, fake2 = _run(cfg, monkeypatch)
    assert again.skipped and again.stage_run_id == result.stage_run_id and fake2.calls == []


def test_a_killed_stage_resumes_with_the_missing_batch_alone(tmp_path, monkeypatch):
    _registry(tmp_path / "a")
    cfg = _config(tmp_path / "a")
    with pytest.raises(RuntimeError, match="killed"):
        _run(cfg, monkeypatch, Fake(fail_at=2))
    resumed, fake = _run(cfg, monkeypatch)
    assert [re.findall(r"answer (c\d)", p) for p in fake.calls[0]["prompts"]] == [["c5"], ["c5"], ["c6"], ["c6"]]
    _registry(tmp_path / "b")
    whole, _ = _run(_config(tmp_path / "b"), monkeypatch)
    assert resumed.stage_run_id == whole.stage_run_id
    assert resumed.stats["dataset_versions"] == whole.stats["dataset_versions"]


@pytest.fixture
def _one_thread(one_torch_thread):
    yield
    release_backends()


def test_a_real_tiny_models_verdicts_are_counted_failures_never_a_crash(tmp_path, tiny_model_path, _one_thread):
    """A random tiny model writes no verdict: each is stored with its raw text and counted, and no pair is made."""
    _registry(tmp_path, model_dir=tiny_model_path)
    cfg = _config(tmp_path, "meta_judge.max_new_tokens=4")
    result = meta_judge(cfg, "r", 1, "m", JUDGE_SID)
    s = result.stats
    assert (s["contrasts"], s["verdicts"]) == (4, 8) and s["judge_pairs"] + s["position_bias"] <= 4
    with Registry(cfg.registry.root) as reg:
        rows = reg.rows("SELECT score, parse_error FROM judgments WHERE stage_run_id = ?", [result.stage_run_id])
        pairs = read_version(reg, stage_version(reg, result.stage_run_id, "judge_pairs")).num_rows
    assert s["parse_failures"] == sum(r["score"] is None for r in rows)
    assert all((r["score"] is None) == (r["parse_error"] is not None) for r in rows)
    assert pairs == s["judge_pairs"]


# --- DPO --------------------------------------------------------------------------------------------------------------
def _dpo(cfg, monkeypatch, state):
    seen = []

    def fake_train_stage(ctx, trainer, model_id, inputs, make_job):  # what DPO would train on, without training
        with Registry(ctx.cfg.registry.root) as reg:
            seen.append((inputs, *make_job(reg, "dpo-x")))

    monkeypatch.setattr(dpo, "train_stage", fake_train_stage)
    dpo.train_dpo(StageContext(cfg, "r", 1), state)
    return seen[0]


def test_dpo_trains_on_the_actor_pairs_plus_the_judge_pairs(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    _registry(tmp_path)
    meta, _ = _run(cfg, monkeypatch)
    actor = build_pairs(cfg, "r", 1, JUDGE_SID)  # p2: c3 vs c4, p3: c6 vs c5 (p1 ties)
    with Registry(cfg.registry.root) as reg:
        actor_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                      for r in read_version(reg, actor.stats["dataset_versions"]["train"]).to_pylist()]
        judge_rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                      for r in read_version(reg, meta.stats["dataset_versions"]["judge_pairs"]).to_pylist()]
    assert len(actor_rows) == 2 and len(judge_rows) == 2

    plain = IterationState(model="m", pairs=actor.stage_run_id)
    inputs, job, record = _dpo(cfg, monkeypatch, plain)
    assert set(inputs) == {"model", "pairs", "cfg", "seed", "ref"}  # without the meta-judge: the inputs as before
    assert job.rows == actor_rows and record["stats"] == {"pairs": 2}

    mixed = IterationState(model="m", pairs=actor.stage_run_id, judge_pairs=meta.stage_run_id)
    inputs2, job, record = _dpo(cfg, monkeypatch, mixed)
    assert inputs2 == {**inputs, "judge_pairs": meta.stage_run_id, "max_judge_pairs": None}
    expected = actor_rows + judge_rows
    random.Random(cfg.run.seed).shuffle(expected)  # mixed, the same way every time
    assert job.rows == expected and _dpo(cfg, monkeypatch, mixed)[1].rows == expected
    stats = record["stats"]
    assert (stats["pairs"], stats["judge_pairs"], stats["judge_pairs_frozen"]) == (2, 2, 2)
    assert stats["judge_pairs_version"] == meta.stats["dataset_versions"]["judge_pairs"]
    assert record["dataset_version"] == actor.stats["dataset_versions"]["train"]

    capped = cfg.model_copy(update={"meta_judge": cfg.meta_judge.model_copy(update={"max_pairs": 1})})
    inputs3, job, record = _dpo(capped, monkeypatch, mixed)
    assert inputs3["max_judge_pairs"] == 1 and stage_run_id("dpo", inputs3) != stage_run_id("dpo", inputs2)
    assert len(job.rows) == 3 and judge_rows[0] in job.rows and judge_rows[1] not in job.rows
    assert (record["stats"]["judge_pairs"], record["stats"]["judge_pairs_frozen"]) == (1, 2)


# --- the pipeline and the config --------------------------------------------------------------------------------------
def test_the_meta_judge_runs_after_the_judge_only_when_on_and_dpo_trains():
    def names(*overrides, iteration=1):
        return [s.name for s in pipeline.steps_for(load_config(None, list(overrides)), iteration)]

    assert names() == ["self_instruct", "generate", "judge", "pairs", "dpo"]
    assert names("meta_judge.enabled=true") == ["self_instruct", "generate", "judge", "meta_judge", "pairs", "dpo"]
    per_iteration = ("meta_judge.enabled=true", "train.trainer=[dpo, rs-sft]")
    assert "meta_judge" not in names(*per_iteration, iteration=2)  # RS-SFT does not train on pairs
    assert pipeline.META_JUDGE.consumes == ("model", "judgments") and pipeline.META_JUDGE.produces == "judge_pairs"
    assert "judge_pairs" in dpo.TRAINER.consumes and dpo.TRAINER.trained_on == ("pairs", "train")
    state = pipeline.next_state(IterationState(model="m2", prompts="si", judge_pairs="meta_judge-x"))
    assert state.judge_pairs is None  # each iteration's own


@pytest.mark.parametrize("overrides, words", [
    (["judge.samples=1"], [r"meta_judge\.enabled", r"judge\.samples >= 2", r"judge\.samples=1"]),
    (["judge.mode=prob"], [r"meta_judge\.enabled", r"judge\.mode=sample", r"judge\.mode=prob"]),
    (["reward.coherent=true", "reward.weights={coherent: 1}"], [r"meta_judge\.enabled", r"reward\.weights"]),
])
def test_the_config_refuses_a_meta_judge_without_several_judge_samples(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["meta_judge.enabled=true", *overrides])
    assert all(re.search(w, str(e.value)) for w in words), str(e.value)
    load_config(None, overrides)  # fine without the meta-judge


def test_preflight_refuses_a_bad_template_or_no_trainer_on_pairs(tmp_path):
    bad = tmp_path / "meta.txt"
    bad.write_text("{instruction} {response} {judgment_a}\nBetter: A or B?")
    with pytest.raises(ConfigError, match=r"meta_judge\.template: .* has no \{judgment_b\} field"):
        pipeline.preflight(_config(tmp_path, f"meta_judge.template={bad}"))
    with pytest.raises(ConfigError, match=r"meta_judge\.enabled: no iteration's trainer trains on judge pairs"):
        pipeline.preflight(_config(tmp_path, "train.trainer=rs-sft"))
    pipeline.preflight(_config(tmp_path))  # the shipped template passes
