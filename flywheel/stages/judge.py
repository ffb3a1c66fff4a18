"""Judge: M_t scores each candidate with the additive 5-point rubric (`prompts/judge.txt`), k samples each.

Every sample is stored with its raw text. The score is parsed from the judge's own words (`score_parser`); a sample
with no valid verdict is stored with score NULL and the reason, counted in the stage's stats, and left out of the
candidate's average. A candidate with no valid sample gets no average and so takes no part in a pair.

With `judge.mode: prob` (transformers backend) each candidate gets one row instead: one forward pass with the reply
begun as "Score:", and the expected score over the probabilities of "0".."5" coming next (`prob_verdict`; a digit
after a space token counts too, see `TransformersBackend.choice_probs`). Its raw text is those probabilities,
renormalised, and their raw mass; when the mass is under MIN_PROB_MASS the model was not about to write a score at
all, and the row is a parse failure ("low_prob_mass") like any other.

`verdicts` is the one way anything here judges: the judge stage, `flywheel eval judge` (`eval_judge.judge_ranked`) and
the mini-world's judge agreement (`experiment.score_model`) each call it on their own batches with their own seeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..backends import GenerationBackend, SamplingParams
from ..config import ConfigError, FlywheelConfig, JudgeConfig, check_template, content_hash
from ..registry import Registry, now
from ..stage import StageResult, backend_for, batch_seed, load_template, pending_batches, read_template, run_stage
from .score_parser import parse_score

PROB_PREFIX = "Score:"  # the reply's start in prob mode; the next token is the verdict
SCORE_CHOICES = [str(i) for i in range(6)]
MIN_PROB_MASS = 0.05  # below this much probability on "0".."5" after "Score:", the row has no score
# What `fill` puts into the judge template, here and in M1's EFT examples (seeds.eft_examples, eft_from_rankings):
# both are required, a judge that never sees the reply scores nothing.
TEMPLATE_FIELDS = ("instruction", "response")


def fill(template: str, instruction: str, response: str) -> str:
    return template.format(instruction=instruction, response=response)


def check_judge(cfg: FlywheelConfig) -> None:
    """Fail before a run starts when the judge mode cannot run on the configured backend, or the judge template
    cannot be filled (`check_template`: exactly {instruction} and {response}); reads the template, loads no model."""
    if cfg.judge.mode == "prob" and cfg.generate.backend != "transformers":
        raise ConfigError(f"judge.mode=prob needs next-token probabilities, which only generate.backend=transformers "
                          f"gives (got {cfg.generate.backend}): set generate.backend=transformers, or "
                          "judge.mode=sample")
    path = cfg.judge.template
    check_template(read_template(path, "judge.template"), "judge.template", path, TEMPLATE_FIELDS)


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


def sampling_params(c: JudgeConfig) -> SamplingParams:
    return SamplingParams(n=c.samples, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)


@dataclass
class Verdicts:
    """One judged item: each sample's raw text (prob mode: one, the probabilities as JSON), parsed score (None when
    it has no valid verdict) and parse error (None when it has one)."""
    raw: list[str]
    scores: list[float | None]
    errors: list[str | None]

    @property
    def score(self) -> float | None:
        """The mean of the valid samples' scores (prob mode: the expected score); None when none is valid."""
        valid = [s for s, e in zip(self.scores, self.errors) if e is None]
        return sum(valid) / len(valid) if valid else None


def verdicts(backend: GenerationBackend, template: str, items: list[tuple[str, str]], c: JudgeConfig,
             seed: int) -> list[Verdicts]:
    """The judge's verdicts on (instruction, response) items, in one backend call: `template` filled with each, then
    `c.samples` sampled replies parsed by `parse_score` (with `seed`), or in `c.mode == "prob"` one forward pass and
    `prob_verdict`. The caller batches (`c.batch_size`) and picks the seed of each batch."""
    texts = [fill(template, x, y) for x, y in items]
    if c.mode == "prob":
        found = [prob_verdict(p) for p in backend.choice_probs(texts, PROB_PREFIX, SCORE_CHOICES,
                                                               batch_size=c.batch_size)]
        return [Verdicts([raw], [score], [error]) for score, raw, error in found]
    out = []
    for gens in backend.generate(texts, sampling_params(c), seed=seed, chat=True):
        parsed = [parse_score(g.text) for g in gens]
        out.append(Verdicts([g.text for g in gens], [v.score for v in parsed], [v.error for v in parsed]))
    return out


def judge(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, candidates_sid: str) -> StageResult:
    check_judge(cfg)
    c = cfg.judge
    prob = c.mode == "prob"
    per_candidate = 1 if prob else c.samples  # rows per candidate
    with Registry(cfg.registry.root) as reg:
        template, template_hash = load_template(reg, c.template, "judge")
    inputs = {"model": model_id, "candidates": candidates_sid, "cfg": c.model_dump(mode="json"),
              "template": template_hash, "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        cands = reg.rows(
            "SELECT c.candidate_id, p.text AS instruction, c.text AS response FROM candidates c "
            "JOIN prompts p USING (prompt_id) WHERE c.stage_run_id = ? ORDER BY c.candidate_id", [candidates_sid])
        sampling = ({"mode": "prob", "prefix": PROB_PREFIX, "choices": SCORE_CHOICES} if prob
                    else sampling_params(c).as_dict())
        common = dict(judge_model_id=model_id, template_hash=template_hash, sampling=sampling, run_id=run_id,
                      iteration=iteration, stage_run_id=sid, config_hash=cfg.config_hash())

        def ids_of(batch: list) -> list[str]:
            return [f"j-{content_hash([sid, x['candidate_id'], k])}" for x in batch for k in range(per_candidate)]

        for b, batch, ids in pending_batches(reg, "judge", "judgments", "judgment_id", cands, c.batch_size, ids_of,
                                             f"judge (iteration {iteration})"):
            found = verdicts(backend_for(cfg, reg, model_id), template,
                             [(x["instruction"], x["response"]) for x in batch], c, batch_seed(sid, b, cfg.run.seed))
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
