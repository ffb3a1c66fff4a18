"""Self-instruct: M_t writes new prompts from few-shot examples; near-duplicates and non-tasks are dropped.

Few-shot (paper: 8-shot, 6 seed + 2 generated): each attempt shows `seed_shots` seed prompts and `few_shot -
seed_shots` prompts generated and kept earlier in the run (earlier iterations and earlier batches of this stage), or
more seeds while there are not enough generated ones. Each prompt records the ids of the examples that produced it.

Every attempt is stored, kept or not; a dropped one records why: `empty`, `too_short`, `too_long`,
`not_instruction` (starts with punctuation or a non-letter, or is mostly not words), `banned_keyword` (asks for
something a text model cannot see or make: images, files, ...), `duplicate`, or `near_duplicate` (ROUGE-L F >=
`dedup_threshold` against a prompt kept so far: seeds, earlier iterations, earlier attempts; see `dedup.py`).
Attempts are made in fixed batches in order, each batch with its own seed, so a resumed stage continues exactly where
a killed one stopped.

With `self_instruct.prompts_file` set, the prompts come from that file instead (`prompts_from_file`): a pool of
unlabeled prompts, as Meta-Rewarding and SPPO use, or a task's generator (`flywheel/miniworld.py`).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .backends import SamplingParams
from .config import FlywheelConfig, SelfInstructConfig, content_hash
from .dedup import NearDuplicateIndex, rouge_l  # noqa: F401  (rouge_l: re-exported for callers and tests)
from .registry import Registry, now
from .stage import StageResult, backend_for, batch_seed, load_template, pending_batches, run_stage

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _banned(text: str, keywords: list[str]) -> bool:
    low = text.lower()
    return any(re.search(rf"\b{re.escape(k.lower())}\b", low) for k in keywords)


def _not_instruction(text: str) -> bool:
    if not text[0].isalpha() or not text[0].isascii():
        return True
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return letters < 0.6 * len(text)


def filter_reason(text: str, index: NearDuplicateIndex, exact: set[tuple[str, ...]], cfg: SelfInstructConfig) -> str | None:
    """Why a generated prompt is dropped, or None to keep it. `index` and `exact` hold the prompts kept so far."""
    if not text.strip():
        return "empty"
    n = len(text.split())
    if n < cfg.min_words:
        return "too_short"
    if n > cfg.max_words:
        return "too_long"
    if _not_instruction(text):
        return "not_instruction"
    if _banned(text, cfg.banned_keywords):
        return "banned_keyword"
    w = words(text)
    if tuple(w) in exact:
        return "duplicate"
    if index.best(w)[0] >= cfg.dedup_threshold:
        return "near_duplicate"
    return None


class KeptPrompts:
    """The prompts kept so far, for the duplicate checks."""

    def __init__(self, threshold: float, texts: list[str] = ()):
        self.index = NearDuplicateIndex(threshold)
        self.exact: set[tuple[str, ...]] = set()
        for t in texts:
            self.add(t)

    def add(self, text: str) -> None:
        w = words(text)
        self.index.add(w)
        self.exact.add(tuple(w))

    def reason(self, text: str, cfg: SelfInstructConfig) -> str | None:
        return filter_reason(text, self.index, self.exact, cfg)


def few_shot(seeds: list[dict], generated: list[dict], cfg: SelfInstructConfig, key: list) -> list[dict]:
    """`cfg.seed_shots` seed prompts and the rest generated ones (seeds again while too few are generated)."""
    rng = random.Random(content_hash(key))
    k_gen = min(cfg.few_shot - min(cfg.seed_shots, cfg.few_shot), len(generated))
    k_seed = min(cfg.few_shot - k_gen, len(seeds))
    shots = rng.sample(seeds, k_seed) + rng.sample(generated, k_gen)
    rng.shuffle(shots)
    return shots


def read_prompts_file(path) -> list[dict]:
    """The rows of `self_instruct.prompts_file`: {'prompt', 'reference' (optional)} per JSON line, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"self_instruct.prompts_file: file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"self_instruct.prompts_file: {path}:{n} is not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ValueError(f"self_instruct.prompts_file: {path}:{n} needs a non-empty string 'prompt'")
        ref = obj.get("reference")
        rows.append({"prompt": obj["prompt"].strip(), "reference": None if ref is None else str(ref)})
    if not rows:
        raise ValueError(f"self_instruct.prompts_file: {path} holds no prompts")
    return rows


def prompts_from_file(cfg: FlywheelConfig, run_id: str, iteration: int, seeds_sid: str,
                      earlier_sids: list[str]) -> StageResult:
    """The iteration's prompts drawn from a file instead of written by the model: `num_prompts` of them, at random
    (seeded), none that a seed or an earlier iteration of the run already used. References come along, for rule
    rewards. Same stage name and rows as self-instruct, with source 'file'."""
    c = cfg.self_instruct
    pool = read_prompts_file(c.prompts_file)
    inputs = {"prompts_file": content_hash(pool), "num_prompts": c.num_prompts, "seeds": seeds_sid,
              "earlier": sorted(earlier_sids), "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        used = {r["text"] for r in reg.rows("SELECT text FROM prompts WHERE stage_run_id IN (SELECT unnest(?))",
                                             [[seeds_sid, *earlier_sids]])}
        fresh = list({r["prompt"]: r for r in pool if r["prompt"] not in used}.values())
        picked = random.Random(content_hash([sid, cfg.run.seed])).sample(fresh, min(c.num_prompts, len(fresh)))
        reg.insert("prompts", [dict(prompt_id=f"p-{content_hash([sid, i])}", run_id=run_id, iteration=iteration,
                                    source="file", text=r["prompt"], reference=r["reference"], seed_id=None,
                                    few_shot_ids=None, kept=True, drop_reason=None, model_id=None, stage_run_id=sid,
                                    config_hash=cfg.config_hash(), created_at=now()) for i, r in enumerate(picked)])
        return {"attempted": len(picked), "kept": len(picked), "dropped": {}, "source": str(c.prompts_file),
                "unused_before": len(fresh)}

    return run_stage(cfg, "self_instruct", run_id, iteration, None, inputs, work)


def self_instruct(cfg: FlywheelConfig, run_id: str, iteration: int, model_id: str, seeds_sid: str,
                  earlier_sids: list[str]) -> StageResult:
    c = cfg.self_instruct
    if c.prompts_file is not None:
        return prompts_from_file(cfg, run_id, iteration, seeds_sid, earlier_sids)
    with Registry(cfg.registry.root) as reg:
        template, template_hash = load_template(reg, c.template, "self_instruct")
    inputs = {"model": model_id, "seeds": seeds_sid, "earlier": sorted(earlier_sids), "cfg": c.model_dump(mode="json"),
              "template": template_hash, "seed": cfg.run.seed}

    def work(reg: Registry, sid: str) -> dict:
        seeds = reg.rows("SELECT prompt_id, text FROM prompts WHERE stage_run_id = ? ORDER BY prompt_id", [seeds_sid])
        # generated prompts kept so far: earlier iterations, and batches of this stage committed before a crash
        generated = reg.rows("SELECT prompt_id, text FROM prompts WHERE kept AND stage_run_id IN (SELECT unnest(?)) "
                             "ORDER BY prompt_id", [[*earlier_sids, sid]])
        kept = KeptPrompts(c.dedup_threshold, [r["text"] for r in seeds + generated])
        params = SamplingParams(n=1, temperature=c.temperature, top_p=c.top_p, max_new_tokens=c.max_new_tokens)

        def ids_of(attempts: list) -> list[str]:
            return [f"p-{content_hash([sid, i])}" for i in attempts]

        all_attempts = list(range(c.num_prompts))
        for b, attempts, ids in pending_batches(reg, "self_instruct", "prompts", "prompt_id", all_attempts,
                                                c.batch_size, ids_of, f"self-instruct (iteration {iteration})"):
            pool = sorted(generated, key=lambda r: r["prompt_id"])  # the same order after a resume
            shots = [few_shot(seeds, pool, c, [sid, i, "shots"]) for i in attempts]
            texts = [template.format(examples="\n".join(f"Task: {e['text']}" for e in s)) for s in shots]
            outs = backend_for(cfg, reg, model_id).generate(texts, params, seed=batch_seed(sid, b, cfg.run.seed),
                                                            chat=False)
            rows = []
            for pid, shot, out in zip(ids, shots, outs):
                text = out[0].text.split("\n")[0].strip()
                reason = kept.reason(text, c)
                if reason is None:
                    kept.add(text)
                    generated.append({"prompt_id": pid, "text": text})
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
