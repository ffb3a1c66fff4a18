"""Reads of the registry that several stages share: the seeds, their human rankings, the kept prompts.

    seeds_from_registry(reg, seeds_sid)      # [Seed]: the IFT seeds of an import
    ranked_from_registry(reg, seeds_sid)     # [RankedPrompt]: human-ranked replies per seed prompt
    kept_prompts(reg, prompts_sid)           # [{prompt_id, prompt, reference}] the stage kept, in prompt id order
"""

from __future__ import annotations

from ..stages.seeds import RankedPrompt, RankedReply, Seed
from .store import Registry


def seeds_from_registry(reg: Registry, seeds_sid: str) -> list[Seed]:
    """The IFT seeds of an import (its seed prompts that have a reference answer)."""
    rows = reg.rows("SELECT seed_id, text, reference FROM prompts WHERE stage_run_id = ? AND reference IS NOT NULL "
                    "ORDER BY prompt_id", [seeds_sid])
    return [Seed(r["seed_id"], r["text"], r["reference"]) for r in rows]


def ranked_from_registry(reg: Registry, seeds_sid: str) -> list[RankedPrompt]:
    """The human-ranked replies of an import, per seed prompt (empty when the seed format has no rankings)."""
    rows = reg.rows(
        "SELECT p.prompt_id, p.seed_id, p.text AS instruction, r.text, r.human_rank FROM seed_responses r "
        "JOIN prompts p USING (prompt_id) WHERE r.stage_run_id = ? "
        "ORDER BY p.prompt_id, r.human_rank NULLS LAST, r.response_id", [seeds_sid])
    replies: dict[str, list[RankedReply]] = {}
    heads: dict[str, tuple[str, str]] = {}
    for r in rows:
        heads.setdefault(r["prompt_id"], (r["seed_id"], r["instruction"]))
        replies.setdefault(r["prompt_id"], []).append(RankedReply(r["text"], r["human_rank"]))
    return [RankedPrompt(*heads[pid], tuple(replies[pid])) for pid in heads]


def kept_prompts(reg: Registry, prompts_sid: str) -> list[dict]:
    """The kept prompts of a self-instruct (or seeds) stage run, in prompt id order: what generation samples for and
    what online trainers train on."""
    return reg.rows("SELECT prompt_id, text AS prompt, reference FROM prompts "
                    "WHERE stage_run_id = ? AND kept ORDER BY prompt_id", [prompts_sid])
