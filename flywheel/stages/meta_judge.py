"""Meta-judge (Meta-Rewarding, Wu et al. 2024, arXiv 2407.19594): M_t judges its own judgments, so the judge is
trained too and improves with the actor instead of staying as weak as M1.

For each candidate with at least two valid judge samples whose scores differ, the highest- and lowest-scored
judgment texts are put to M_t with `prompts/meta_judge.txt` ({instruction}, {response}, {judgment_a},
{judgment_b}) twice: the higher-scored one as A, then as B, to cancel position bias. Each verdict ("Better: A" /
"Better: B", `parse_verdict`) is stored with its raw text; an unparseable one is a counted failure, never a crash.
A candidate whose two verdicts agree gives a judge-preference pair: prompt = the judge template filled with that
instruction and response (exactly what the judge saw), chosen = the preferred judgment text, rejected = the other.

Where it is stored: the verdicts are rows of `judgments` (no new table) under this stage's run id, told apart from the
judge's by it, by their template (registered as "meta_judge") and by sampling.mode "meta": candidate_id is the
candidate whose judgments were compared, sample_index 0 the order higher-first and 1 lower-first, raw_text the
verdict, score 1.0 when it preferred the higher-scored judgment and 0.0 when the lower (NULL and parse_error when it
gave none), sampling.shown the ids of the judgments shown as A and B. So the stage resumes batch by batch as the judge
does (`run_batches`), and its dataset version "judge_pairs" (TRL's preference format plus candidate_id, the two
judgment ids and both verdict texts) is frozen from those rows by SQL (flywheel/registry/datasets.py), which
`restore_version` can rebuild. DPO trains on it beside the actor pairs (flywheel/training/dpo.py).
"""

from __future__ import annotations

import re

from ..backends import SamplingParams
from ..config import ConfigError, FlywheelConfig, check_template, content_hash
from ..registry import Registry, now
from ..stage import StageResult, backend_for, batch_seed, load_template, read_template, run_batches, run_stage

FIELDS = ("instruction", "response", "judgment_a", "judgment_b")  # what the meta-judge template is filled with
# "Better: A" (also "Better judgment: B", "Winner = A", "Verdict: **B**"), the last one in the reply; or a bare letter
VERDICT = re.compile(r"(?i:better(?:\s+judge?ment)?|winner|verdict)\s*[:=]\s*[*(\[]*\s*(?i:judge?ment\s+)?([AB])\b")
BARE = re.compile(r"\W*([AB])\W*")

# Per candidate with contrasting valid judge samples: its texts and the highest- (then first) and lowest- (then
# first) scored sample.
CONTRASTS_SQL = """
SELECT j.candidate_id, any_value(p.text) AS instruction, any_value(c.text) AS response,
       arg_max({'id': j.judgment_id, 'text': j.raw_text}, (j.score, -j.sample_index)) AS higher,
       arg_min({'id': j.judgment_id, 'text': j.raw_text}, (j.score, j.sample_index)) AS lower
FROM judgments j JOIN candidates c USING (candidate_id) JOIN prompts p USING (prompt_id)
WHERE j.stage_run_id = ? AND j.score IS NOT NULL
GROUP BY j.candidate_id HAVING min(j.score) < max(j.score)
ORDER BY j.candidate_id
"""
STATS_SQL = """
SELECT sum(verdicts) AS verdicts, sum(parsed) AS parsed,
       count(*) FILTER (WHERE parsed = 2 AND agree) AS pairs,
       count(*) FILTER (WHERE parsed = 2 AND NOT agree) AS position_bias,
       count(*) FILTER (WHERE parsed = 2 AND agree AND higher) AS higher_preferred
FROM (SELECT count(*) AS verdicts, count(score) AS parsed, min(score) = max(score) AS agree, min(score) = 1 AS higher
      FROM judgments WHERE stage_run_id = ? GROUP BY candidate_id)
"""


def parse_verdict(text: str) -> tuple[str | None, str | None]:
    """("A" or "B", None) from a meta-judge reply, or (None, "empty" / "no_verdict")."""
    found = VERDICT.findall(text)
    if found:
        return found[-1], None
    bare = BARE.fullmatch(text)
    if bare:
        return bare.group(1), None
    return None, "empty" if not text.strip() else "no_verdict"


def check_meta_judge(cfg: FlywheelConfig) -> None:
    """Fail before work when meta_judge.template is missing or not exactly its four fields (`check_template`)."""
    path = cfg.meta_judge.template
    check_template(read_template(path, "meta_judge.template"), "meta_judge.template", path, FIELDS)
    if cfg.judge.mode != "sample" or cfg.judge.samples < 2:  # also checked when the config loads
        raise ConfigError("meta_judge.enabled needs judge.mode=sample and judge.samples >= 2")


def sampling_params(cfg: FlywheelConfig) -> SamplingParams:
    c = cfg.meta_judge
    return SamplingParams(n=1, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)


def meta_judge(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, judge_sid: str) -> StageResult:
    """M_t's verdicts on the contrasting judge samples of the judge stage run `judge_sid`; the judge_pairs version."""
    check_meta_judge(cfg)
    c = cfg.meta_judge
    with Registry(cfg.registry.root) as reg:
        template, template_hash = load_template(reg, c.template, "meta_judge")
    # max_pairs is DPO's (how many of the pairs it trains on), not this stage's
    inputs = {"model": model_id, "judgments": judge_sid, "template": template_hash, "seed": cfg.run.seed,
              "cfg": c.model_dump(mode="json", exclude={"enabled", "max_pairs", "template"})}

    def work(reg: Registry, sid: str) -> dict:
        items = reg.rows(CONTRASTS_SQL, [judge_sid])
        common = dict(judge_model_id=model_id, template_hash=template_hash, run_id=run_id, iteration=iteration,
                      stage_run_id=sid, config_hash=cfg.config_hash())
        params = sampling_params(cfg)

        def ids_of(batch: list) -> list[str]:
            return [f"mj-{content_hash([sid, x['candidate_id'], k])}" for x in batch for k in (0, 1)]

        def shown_of(batch: list) -> list[tuple]:
            """(item, order, judgment shown as A, as B): the higher-scored first (order 0), then second (order 1)."""
            return [(x, k, *((x["higher"], x["lower"]) if k == 0 else (x["lower"], x["higher"])))
                    for x in batch for k in (0, 1)]

        def compare(engine, b: int, batch: list, run_seed=cfg.run.seed):
            """A batch's verdicts; runs where the engine is (a Ray worker too): no registry in here."""
            texts = [template.format(instruction=x["instruction"], response=x["response"], judgment_a=first["text"],
                                     judgment_b=second["text"]) for x, _, first, second in shown_of(batch)]
            return engine.generate(texts, params, seed=batch_seed(sid, b, run_seed), chat=True)

        for b, batch, ids, gens in run_batches(reg, "meta_judge", "judgments", "judgment_id", items, c.batch_size,
                                               ids_of, f"meta-judge (iteration {iteration})",
                                               lambda: backend_for(cfg, reg, model_id), compare):
            shown = shown_of(batch)
            rows = []
            for jid, (x, k, first, second), g in zip(ids, shown, gens):
                letter, error = parse_verdict(g[0].text)
                score = None if letter is None else float((letter == "A") == (k == 0))  # 1: the higher-scored won
                rows.append(dict(judgment_id=jid, candidate_id=x["candidate_id"], sample_index=k, raw_text=g[0].text,
                                 score=score, parse_error=error, created_at=now(),
                                 sampling={**params.as_dict(), "mode": "meta", "shown": [first["id"], second["id"]]},
                                 **common))
            reg.insert("judgments", rows)
        s = reg.rows(STATS_SQL, [sid])[0]
        verdicts, parsed = int(s["verdicts"] or 0), int(s["parsed"] or 0)
        return {"contrasts": len(items), "verdicts": verdicts, "parse_failures": verdicts - parsed,
                "judge_pairs": s["pairs"], "position_bias": s["position_bias"],
                "higher_preferred": s["higher_preferred"]}

    return run_stage(cfg, "meta_judge", run_id, iteration, model_id, inputs, work)
