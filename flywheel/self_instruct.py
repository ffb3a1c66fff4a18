"""Self-instruct: M_t writes new prompts from few-shot examples of the seed prompts; duplicates are dropped.

Every attempt is stored, kept or not; a dropped one records why (`empty`, `too_short`, `too_long`, `duplicate`,
`near_duplicate`). Near-duplicate means ROUGE-L F >= `dedup_threshold` against any prompt kept so far: the seeds,
prompts kept in earlier iterations of the run, and earlier attempts of this stage. Attempts are made in fixed batches
in order, each batch with its own seed, so a resumed stage continues exactly where a killed one stopped.
"""

from __future__ import annotations

import random
import re

from .backends import SamplingParams
from .config import FlywheelConfig, content_hash
from .registry import Registry, now
from .stage import StageResult, backend_for, batch_seed, load_template, pending_batches, run_stage

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 between two token lists: the longest common subsequence against both lengths."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def filter_reason(text: str, kept: list[list[str]], cfg) -> str | None:
    """Why a generated prompt is dropped, or None to keep it. `kept` holds the word lists of prompts kept so far."""
    w = words(text)
    if not text.strip():
        return "empty"
    if len(text.split()) < cfg.min_words:
        return "too_short"
    if len(text.split()) > cfg.max_words:
        return "too_long"
    if any(w == k for k in kept):
        return "duplicate"
    if any(rouge_l(w, k) >= cfg.dedup_threshold for k in kept):
        return "near_duplicate"
    return None


def self_instruct(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, seeds_sid: str,
                  earlier_sids: list[str]) -> StageResult:
    c = cfg.self_instruct
    with Registry(cfg.registry.root) as reg:
        template, template_hash = load_template(reg, c.template, "self_instruct")
    inputs = {"model": model_id, "seeds": seeds_sid, "earlier": sorted(earlier_sids), "cfg": c.model_dump(mode="json"),
              "template": template_hash, "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        examples = reg.rows("SELECT prompt_id, text FROM prompts WHERE stage_run_id = ? ORDER BY prompt_id", [seeds_sid])
        pool = reg.rows(
            "SELECT text FROM prompts WHERE kept AND (stage_run_id IN (SELECT unnest(?)) OR stage_run_id = ?) "
            "ORDER BY prompt_id", [[seeds_sid, *earlier_sids], sid])
        kept = [words(r["text"]) for r in pool]
        params = SamplingParams(n=1, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)

        def ids_of(attempts: list) -> list[str]:
            return [f"p-{content_hash([sid, i])}" for i in attempts]

        all_attempts = list(range(c.num_prompts))
        for b, attempts, ids in pending_batches(reg, "self_instruct", "prompts", "prompt_id", all_attempts,
                                                c.batch_size, ids_of, f"self-instruct (iteration {iteration})"):
            shots = []
            for i in attempts:
                rng = random.Random(content_hash([sid, i, "shots"]))
                shots.append(rng.sample(examples, min(c.few_shot, len(examples))))
            texts = [template.format(examples="\n".join(f"Task: {e['text']}" for e in s)) for s in shots]
            outs = backend_for(cfg, reg, model_id).generate(texts, params, seed=batch_seed(sid, b, cfg.run.seed),
                                                            chat=False)
            rows = []
            for pid, shot, out in zip(ids, shots, outs):
                text = out[0].text.split("\n")[0].strip()
                reason = filter_reason(text, kept, c)
                if reason is None:
                    kept.append(words(text))
                rows.append(dict(prompt_id=pid, run_id=run_id, iteration=iteration, source="self_instruct",
                                 text=text, reference=None, seed_id=None, few_shot_ids=[e["prompt_id"] for e in shot],
                                 kept=reason is None, drop_reason=reason, model_id=model_id, stage_run_id=sid,
                                 config_hash=cfg.config_hash(), created_at=now()))
            reg.insert("prompts", rows)
        counts = reg.rows("SELECT coalesce(drop_reason, 'kept') AS k, count(*) AS n FROM prompts WHERE stage_run_id = ? "
                          "GROUP BY ALL ORDER BY k", [sid])
        by = {r["k"]: r["n"] for r in counts}
        return {"attempted": sum(by.values()), "kept": by.pop("kept", 0), "dropped": by}

    return run_stage(cfg, "self_instruct", run_id, iteration, model_id, inputs, work)
