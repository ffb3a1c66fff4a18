"""Judge: M_t scores each candidate with the additive 5-point rubric (`prompts/judge.txt`), k samples each.

Every sample is stored with its raw text. The score is parsed from the judge's own words (`score_parser`); a sample
with no valid verdict is stored with score NULL and the reason, counted in the stage's stats, and left out of the
candidate's average. A candidate with no valid sample gets no average and so takes no part in a pair.

With `judge.mode: prob` (transformers backend, or ray with the transformers engine) each candidate gets one row
instead: one forward pass with the reply begun as "Score:", and the expected score over the probabilities of "0".."5"
coming next (`prob_verdict`; a digit after a space token counts too, see `TransformersBackend.choice_probs`). Its
raw text is those probabilities, renormalised, and their raw mass; when the mass is under MIN_PROB_MASS the model was
not about to write a score at all, and the row is a parse failure ("low_prob_mass") like any other.

With `judge.mode: verify` (the same backends) the judge answers one yes/no question per requirement of the prompt
instead of scoring it whole: `judge.checklist` ("module:function", called with the prompt and its `reference`) gives
the requirement texts (none: one generic requirement), `judge.verify_template` (`prompts/verify.txt`) asks the
question, and one forward pass with the reply begun as "Answer:" gives P(yes) / (P(yes) + P(no)) for each ("yes" and
"Yes" count as yes, "no" and "No" as no, each with or without a leading space). The candidate's one row scores
5 x the mean of those over its requirements, so it is on the 0-5 scale of the other modes (`verify_verdict`).
A requirement with under MIN_PROB_MASS on yes + no is left out of the mean; a candidate with none left is a
"low_prob_mass" failure; a checklist that raises, or returns no requirement, is a "checklist_error" /
"checklist_empty" failure of each of that prompt's candidates, its reason in the raw text. M1's EFT judge-training
examples are filled with `judge.template` in every mode: verify mode does not change them.

`verdicts` is the one way anything here judges: the judge stage, `flywheel eval judge` (`eval_judge.judge_ranked`) and
the mini-world's judge agreement (`experiment.score_model`) each call it on their own batches with their own seeds.
Its template is the mode's: `judge_template_path(c)` (`read_judge_template(c)` reads it).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..backends import GenerationBackend, SamplingParams
from ..config import ConfigError, FlywheelConfig, JudgeConfig, check_template, content_hash
from ..registry import Registry, now
from ..stage import StageResult, backend_for, batch_seed, load_template, read_template, run_batches, run_stage
from .score_parser import parse_score

PROB_PREFIX = "Score:"  # the reply's start in prob mode; the next token is the verdict
SCORE_CHOICES = [str(i) for i in range(6)]
MIN_PROB_MASS = 0.05  # below this much probability on "0".."5" after "Score:", the row has no score
VERIFY_PREFIX = "Answer:"  # the reply's start in verify mode; the next token is yes or no
YES_CHOICES = ["yes", "Yes"]
NO_CHOICES = ["no", "No"]
VERIFY_CHOICES = YES_CHOICES + NO_CHOICES
GENERIC_REQUIREMENT = "The response does what the request asks, correctly and completely."
VERIFY_FIELDS = ("instruction", "response", "requirement")  # what the verify template is filled with
VERIFY_ONLY = {"verify_template", "checklist"}  # judge settings only verify mode reads (not in other modes' keys)
# What `fill` puts into the judge template, here and in M1's EFT examples (seeds.eft_examples, eft_from_rankings):
# both are required, a judge that never sees the reply scores nothing.
TEMPLATE_FIELDS = ("instruction", "response")


def fill(template: str, instruction: str, response: str) -> str:
    return template.format(instruction=instruction, response=response)


def judge_template_path(c: JudgeConfig) -> Path:
    """The template `verdicts` is given in `c.mode`: judge.verify_template in verify mode, else judge.template."""
    return c.verify_template if c.mode == "verify" else c.template


def judge_template_setting(c: JudgeConfig) -> str:
    """The config field `judge_template_path(c)` comes from, for messages."""
    return "judge.verify_template" if c.mode == "verify" else "judge.template"


def read_judge_template(c: JudgeConfig) -> str:
    """The text of `judge_template_path(c)`: what `verdicts` takes as its template in `c.mode`."""
    return read_template(judge_template_path(c), judge_template_setting(c))


def check_judge(cfg: FlywheelConfig) -> None:
    """Fail before a run starts when the judge mode cannot run on the configured backend, or the judge template
    cannot be filled (`check_template`: exactly {instruction} and {response}; M1's EFT fills it in every mode); in
    verify mode also when the verify template is not exactly {instruction}, {response} and {requirement}, or
    judge.checklist names no function. Reads the templates and imports the checklist's module, loads no model."""
    c = cfg.judge
    engine = cfg.ray.engine if cfg.generate.backend == "ray" else cfg.generate.backend
    if c.mode in ("prob", "verify") and engine != "transformers":
        got = f"ray with ray.engine={engine}" if cfg.generate.backend == "ray" else engine
        raise ConfigError(f"judge.mode={c.mode} needs next-token probabilities, which only generate.backend="
                          f"transformers (or ray with ray.engine=transformers) gives (got {got}): set "
                          "generate.backend=transformers, or judge.mode=sample")
    check_template(read_template(c.template, "judge.template"), "judge.template", c.template, TEMPLATE_FIELDS)
    if c.mode == "verify":
        path = c.verify_template
        check_template(read_template(path, "judge.verify_template"), "judge.verify_template", path, VERIFY_FIELDS)
        load_checklist(c.checklist)


def generic_checklist(prompt: str, reference: str | None) -> list[str]:
    """The checklist when judge.checklist is not set: one requirement, that the response does what was asked."""
    return [GENERIC_REQUIREMENT]


def load_checklist(spec: str | None) -> Callable[[str, str | None], list[str]]:
    """The function judge.checklist names ("module:function"), or `generic_checklist` for None; a ConfigError naming
    judge.checklist when it is malformed, its module does not import, or it names nothing callable."""
    if spec is None:
        return generic_checklist
    module_name, _, name = spec.partition(":")
    if not module_name.strip() or not name.strip():
        raise ConfigError(f"judge.checklist: {spec!r} is not of the form 'module:function' (e.g. "
                          "flywheel.analysis.ifworld:checklist)")
    try:
        module = importlib.import_module(module_name.strip())
    except Exception as e:
        raise ConfigError(f"judge.checklist: cannot import module {module_name!r} of {spec!r}: "
                          f"{type(e).__name__}: {e}") from None
    fn = getattr(module, name.strip(), None)
    if not callable(fn):
        raise ConfigError(f"judge.checklist: module {module_name!r} has no function {name!r}")
    return fn


def requirements_of(check: Callable, spec: str | None, prompt: str, reference) -> tuple[list[str], str | None, str]:
    """(requirement texts, error, why) from the checklist function `check` on one prompt: error None when it gave a
    non-empty list of non-empty texts, else "checklist_error" (it raised or returned something else) or
    "checklist_empty", and why in words. Never raises for what the checklist does."""
    name = spec or "generic"
    try:
        found = check(prompt, reference)
    except Exception as e:
        return [], "checklist_error", f"checklist {name} raised {type(e).__name__}: {str(e)[:300]}"
    if not isinstance(found, (list, tuple)) or not all(isinstance(r, str) and r.strip() for r in found):
        return [], "checklist_error", f"checklist {name} returned {str(found)[:120]!r}, not a list of requirement texts"
    if not found:
        return [], "checklist_empty", f"checklist {name} returned no requirement for this prompt"
    return list(found), None, ""


def prob_verdict(probs: list[float]) -> tuple[float | None, str, str | None]:
    """(score, raw_text, parse_error) from the raw next-token probabilities of "0".."5": the expected score
    sum_i p_i * i / sum_i p_i, and a compact JSON of the renormalised probabilities and their raw mass. Under
    MIN_PROB_MASS: no score, error "low_prob_mass"."""
    if len(probs) != len(SCORE_CHOICES):
        raise ValueError(f"expected {len(SCORE_CHOICES)} probabilities (scores 0-5), got {len(probs)}")
    mass = sum(probs)
    shares = [p / mass for p in probs] if mass > 0 else [0.0] * len(probs)
    raw = json.dumps({"probs": [round(p, 6) for p in shares], "mass": round(mass, 6)}, separators=(",", ":"))
    if mass < MIN_PROB_MASS:
        return None, raw, "low_prob_mass"
    return sum(i * p for i, p in enumerate(probs)) / mass, raw, None


def verify_verdict(probs: list[list[float]]) -> tuple[float | None, str, str | None]:
    """(score, raw_text, parse_error) of one candidate from the raw next-token probabilities of VERIFY_CHOICES after
    "Answer:", one list per requirement: each requirement's yes share P(yes) / (P(yes) + P(no)) and mass
    P(yes) + P(no); the score is 5 x the mean yes share over the requirements whose mass is at least MIN_PROB_MASS
    (the others are left out: the judge was not about to answer yes or no). None left: no score, "low_prob_mass".
    The raw text is the compact JSON {"yes": [...], "mass": [...]}, one entry per requirement."""
    if not probs:
        raise ValueError("verify_verdict needs at least one requirement's probabilities")
    shares, masses = [], []
    for p in probs:
        if len(p) != len(VERIFY_CHOICES):
            raise ValueError(f"expected {len(VERIFY_CHOICES)} probabilities ({', '.join(VERIFY_CHOICES)}), "
                             f"got {len(p)}")
        yes, mass = sum(p[:len(YES_CHOICES)]), sum(p)
        shares.append(yes / mass if mass > 0 else 0.0)
        masses.append(mass)
    raw = json.dumps({"yes": [round(s, 6) for s in shares], "mass": [round(m, 6) for m in masses]},
                     separators=(",", ":"))
    used = [s for s, m in zip(shares, masses) if m >= MIN_PROB_MASS]
    if not used:
        return None, raw, "low_prob_mass"
    return 5.0 * sum(used) / len(used), raw, None


def sampling_params(c: JudgeConfig) -> SamplingParams:
    return SamplingParams(n=c.samples, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)


@dataclass
class Verdicts:
    """One judged item: each sample's raw text (prob and verify modes: one, the probabilities as JSON), parsed score
    (None when it has no valid verdict) and parse error (None when it has one)."""
    raw: list[str]
    scores: list[float | None]
    errors: list[str | None]

    @property
    def score(self) -> float | None:
        """The mean of the valid samples' scores (prob mode: the expected score; verify mode: 5 x the mean P(yes));
        None when none is valid."""
        valid = [s for s, e in zip(self.scores, self.errors) if e is None]
        return sum(valid) / len(valid) if valid else None


def verdicts(backend: GenerationBackend, template: str, items: Sequence[tuple], c: JudgeConfig,
             seed: int) -> list[Verdicts]:
    """The judge's verdicts on (instruction, response) or (instruction, response, reference) items, in one backend
    call: `template` filled with each, then `c.samples` sampled replies parsed by `parse_score` (with `seed`), or in
    `c.mode == "prob"` one forward pass and `prob_verdict`, or in `c.mode == "verify"` one forward pass per
    requirement (`verify_verdicts`; `template` is then the verify template, `read_judge_template(c)`, and the
    reference, None when not given, goes to the checklist). The caller batches (`c.batch_size`) and picks the seed of
    each batch."""
    if c.mode == "verify":
        return verify_verdicts(backend, template, items, c)
    texts = [fill(template, item[0], item[1]) for item in items]
    if c.mode == "prob":
        found = [prob_verdict(p) for p in backend.choice_probs(texts, PROB_PREFIX, SCORE_CHOICES,
                                                               batch_size=c.batch_size)]
        return [Verdicts([raw], [score], [error]) for score, raw, error in found]
    out = []
    for gens in backend.generate(texts, sampling_params(c), seed=seed, chat=True):
        parsed = [parse_score(g.text) for g in gens]
        out.append(Verdicts([g.text for g in gens], [v.score for v in parsed], [v.error for v in parsed]))
    return out


def verify_verdicts(backend: GenerationBackend, template: str, items: Sequence[tuple], c: JudgeConfig
                    ) -> list[Verdicts]:
    """Verify mode: each item's requirements from `c.checklist` (called once per distinct prompt and reference),
    `template` filled with the instruction, response and each requirement, one `choice_probs` call over them all,
    and `verify_verdict` per item. A checklist failure is that item's verdict (no score, its reason as raw text);
    a template without {requirement} (the holistic one passed by mistake) is a ConfigError before any pass."""
    check_template(template, "judge.verify_template", "(the template given to judge.verdicts in verify mode)",
                   VERIFY_FIELDS)
    check = load_checklist(c.checklist)
    known: dict = {}
    found: list[Verdicts | None] = []
    texts, owner = [], []
    for i, item in enumerate(items):
        instruction, response = item[0], item[1]
        reference = item[2] if len(item) > 2 else None
        key = (instruction, reference) if reference is None or isinstance(reference, str) else None
        got = known.get(key) if key is not None else None
        if got is None:
            got = requirements_of(check, c.checklist, instruction, reference)
            if key is not None:
                known[key] = got
        reqs, error, why = got
        if error is not None:
            raw = json.dumps({"error": why}, separators=(",", ":"))
            found.append(Verdicts([raw], [None], [error]))
            continue
        found.append(None)
        for r in reqs:
            texts.append(template.format(instruction=instruction, response=response, requirement=r))
            owner.append(i)
    try:
        probs = backend.choice_probs(texts, VERIFY_PREFIX, VERIFY_CHOICES, batch_size=c.batch_size) if texts else []
    except ValueError as e:
        raise ValueError(f"judge.mode=verify reads the next-token probabilities of {VERIFY_CHOICES} after "
                         f"{VERIFY_PREFIX!r}: {e}") from e
    per_item: dict[int, list[list[float]]] = {}
    for i, p in zip(owner, probs):
        per_item.setdefault(i, []).append(p)
    out = []
    for i, v in enumerate(found):
        if v is None:
            score, raw, error = verify_verdict(per_item[i])
            v = Verdicts([raw], [score], [error])
        out.append(v)
    return out


def judge_inputs(cfg: FlywheelConfig, model_id: str, candidates_sid: str, template_hash: str) -> dict:
    """What the judge stage's id is the hash of; `template_hash` is that of `judge_template_path(cfg.judge)`.
    judge.verify_template and judge.checklist are in it only in verify mode, so the other modes keep the stage ids
    they had before verify mode existed."""
    c = cfg.judge
    return {"model": model_id, "candidates": candidates_sid,
            "cfg": c.model_dump(mode="json", exclude=None if c.mode == "verify" else VERIFY_ONLY),
            "template": template_hash, "seed": cfg.run.seed}


def judge(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, candidates_sid: str) -> StageResult:
    check_judge(cfg)
    c = cfg.judge
    verify = c.mode == "verify"
    per_candidate = c.samples if c.mode == "sample" else 1  # rows per candidate
    with Registry(cfg.registry.root) as reg:
        template, template_hash = load_template(reg, judge_template_path(c), "judge_verify" if verify else "judge")
    inputs = judge_inputs(cfg, model_id, candidates_sid, template_hash)

    def work(reg: Registry, sid: str) -> dict:
        cands = reg.rows(
            "SELECT c.candidate_id, p.text AS instruction, c.text AS response, p.reference FROM candidates c "
            "JOIN prompts p USING (prompt_id) WHERE c.stage_run_id = ? ORDER BY c.candidate_id", [candidates_sid])
        sampling = ({"mode": "prob", "prefix": PROB_PREFIX, "choices": SCORE_CHOICES} if c.mode == "prob"
                    else {"mode": "verify", "prefix": VERIFY_PREFIX, "choices": VERIFY_CHOICES,
                          "checklist": c.checklist} if verify
                    else sampling_params(c).as_dict())
        common = dict(judge_model_id=model_id, template_hash=template_hash, sampling=sampling, run_id=run_id,
                      iteration=iteration, stage_run_id=sid, config_hash=cfg.config_hash())

        def ids_of(batch: list) -> list[str]:
            return [f"j-{content_hash([sid, x['candidate_id'], k])}" for x in batch for k in range(per_candidate)]

        def judge_batch(engine, b: int, batch: list, run_seed=cfg.run.seed) -> list[Verdicts]:
            """A batch's verdicts; runs where the engine is (a Ray worker too): no registry in here."""
            return verdicts(engine, template, [(x["instruction"], x["response"], x["reference"]) for x in batch], c,
                            batch_seed(sid, b, run_seed))

        for b, batch, ids, found in run_batches(reg, "judge", "judgments", "judgment_id", cands, c.batch_size, ids_of,
                                                f"judge (iteration {iteration})",
                                                lambda: backend_for(cfg, reg, model_id), judge_batch):
            samples = [(x, k, *s) for x, v in zip(batch, found) for k, s in enumerate(zip(v.raw, v.scores, v.errors))]
            reg.insert("judgments", [dict(judgment_id=jid, candidate_id=x["candidate_id"], sample_index=k, raw_text=raw,
                                          score=score, parse_error=error, created_at=now(), **common)
                                     for jid, (x, k, raw, score, error) in zip(ids, samples)])
        row = reg.rows(
            "SELECT count(*) AS samples, count(score) AS parsed, avg(score) AS mean_score, "
            "count(DISTINCT candidate_id) FILTER (WHERE score IS NOT NULL) AS scored_candidates "
            "FROM judgments WHERE stage_run_id = ?", [sid])[0]
        errors = reg.rows("SELECT parse_error AS e, count(*) AS n FROM judgments WHERE stage_run_id = ? "
                          "AND parse_error IS NOT NULL GROUP BY ALL ORDER BY e", [sid])
        return {"samples": row["samples"], "parse_failures": row["samples"] - row["parsed"],
                "parse_errors": {r["e"]: r["n"] for r in errors}, "scored_candidates": row["scored_candidates"],
                "candidates": len(cands), "mean_score": round(row["mean_score"], 3) if row["parsed"] else None}

    return run_stage(cfg, "judge", run_id, iteration, model_id, inputs, work)
