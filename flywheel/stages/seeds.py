"""Seed data: the human-written tasks the flywheel starts from, in the formats people have them.

    data = load_seed_data("oasst1_trees.jsonl", format="auto")   # SeedData: .ift (Seed) and .ranked (RankedPrompt)
    seeds = load_seeds("seeds/demo.jsonl")                       # just the IFT seeds

Formats (`seeds.format`; every one may be JSON Lines or a JSON array, optionally gzipped):
- `flywheel`: `{"id", "instruction", "response"}` (the shipped `seeds/demo.jsonl`); `id` defaults to the line.
- `oasst`: Open Assistant message trees, one per line: `{"message_tree_id", "prompt": {"text", "role": "prompter",
  "replies": [{"text", "role": "assistant", "rank", "replies": [...]}, ...]}}`. IFT is the first-turn assistant reply
  of rank 0 (the humans' best) per tree; a tree without one gives no IFT seed (counted in `skipped`). A tree's
  first-turn replies, when at least one is ranked, are kept with their ranks as a `RankedPrompt` (for EFT and judge
  evaluation); a null rank is kept as None and takes part in neither. Deleted replies and later turns are not read.
  No language filter: select the trees you want (e.g. by `lang`) before loading.
- `self_instruct`: `{"id", "name", "instruction", "instances": [{"input", "output"}], "is_classification"}`: the
  instruction, plus the instance input on its own lines when non-empty -> the instance output (a seed per instance).
- `alpaca`: `{"instruction", "input", "output"}` (the Alpaca JSON array), mapped like self_instruct.
- `chat`: `{"messages": [{"role", "content"}, ...]}`: the first user turn -> the first assistant turn after it.
- `auto`: decided by the first record's keys (`messages`: chat; `message_tree_id` or a `prompt` object: oasst;
  `instances`: self_instruct; `instruction` and `output`: alpaca; other `instruction` records: flywheel), for a
  `.json`, `.jsonl` or `.ndjson` file, optionally `.gz`.
A malformed record raises `SeedFormatError` naming `file:line` (JSON Lines) or `file[index]` (a JSON array), and so
does, with `max_chars` (`seeds.max_chars`, checked by the run's preflight), a prompt or reply longer than that.

From the seeds we make M1's training data, as the paper does (IFT + EFT):
- IFT: (instruction -> response) chat examples.
- EFT: judge-training examples: the judge prompt filled with an instruction and a reply, answered by a short
  justification and `Score: N` (`judge_target`). With human-ranked replies, `eft_from_rankings` maps ranks to points
  (see `rank_points`) and re-balances the scores. Without them, `eft_examples` makes replies of known quality from
  the seeds: the seed's own answer (5 points), its first third (2: on topic, partial), another seed's answer (0).
"""

from __future__ import annotations

import gzip
import json
import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

FORMATS = ("flywheel", "oasst", "self_instruct", "alpaca", "chat")
SUFFIXES = (".jsonl", ".json", ".ndjson")


class SeedFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Seed:
    id: str
    instruction: str
    response: str


class RankedReply(NamedTuple):
    text: str
    rank: int | None  # 0 = the humans' best; None = not ranked


@dataclass(frozen=True)
class RankedPrompt:
    """A prompt with human-written replies and their human ranks (lower is better; ties share a rank)."""

    id: str
    instruction: str
    replies: tuple[RankedReply, ...]

    def ranked_replies(self) -> list[RankedReply]:
        return [r for r in self.replies if r.rank is not None]


@dataclass
class SeedData:
    path: Path
    format: str
    ift: list[Seed]
    ranked: list[RankedPrompt] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> records that gave no IFT seed
    unranked: int = 0  # oasst trees with no human-ranked reply: not in `ranked` (judge evaluation cannot use them)


# --- reading records -------------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise SeedFormatError(f"{path}: cannot read the seed file as UTF-8 text ({e})") from None


def _records(path: Path) -> list[tuple[str, str, Any]]:
    """(where, label, parsed record) for each record of a JSON array (`file[i]`, `record-i`) or a JSON Lines file
    (`file:line`, `line-n`). The label is the default id of a record that has none. A `.jsonl`/`.ndjson` file is
    JSON Lines; any other is a JSON array when its text starts with '['."""
    text = _read_text(path)
    lines = path.name.removesuffix(".gz").endswith((".jsonl", ".ndjson"))
    if not lines and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise SeedFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        return [(f"{path}[{i}]", f"record-{i}", obj) for i, obj in enumerate(items)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", f"line-{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise SeedFormatError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


def _object(where: str, obj: Any) -> dict:
    if not isinstance(obj, dict):
        raise SeedFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _text(where: str, obj: dict, key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise SeedFormatError(f"{where}: '{key}' must be a non-empty string" if required
                              else f"{where}: '{key}' must be a string")
    return value.strip()


def _list(where: str, obj: dict, key: str) -> list:
    value = obj.get(key, [])
    if not isinstance(value, list):
        raise SeedFormatError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
    return value


def _with_input(instruction: str, inp: str) -> str:
    return f"{instruction}\n\n{inp}" if inp else instruction


# --- one parser per format: (where, record, label) -> (IFT seeds, ranked prompt or None, skip reason or None) -------
Parsed = tuple[list[Seed], RankedPrompt | None, str | None]


def _flywheel(where: str, obj: dict, label: str) -> Parsed:
    seed = Seed(str(obj.get("id", label)), _text(where, obj, "instruction"), _text(where, obj, "response"))
    return [seed], None, None


def _rank(where: str, reply: dict) -> int | None:
    rank = reply.get("rank")
    if rank is None:
        return None
    if isinstance(rank, float) and rank.is_integer():
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise SeedFormatError(f"{where}: a reply's 'rank' must be a non-negative integer or null, got {rank!r}")
    return rank


def _oasst(where: str, obj: dict, label: str) -> Parsed:
    prompt = obj.get("prompt")
    if not isinstance(prompt, dict):
        raise SeedFormatError(f"{where}: 'prompt' must be a message object (an Open Assistant message tree)")
    if prompt.get("role", "prompter") != "prompter":
        raise SeedFormatError(f"{where}: the tree's 'prompt' has role {prompt.get('role')!r}, expected 'prompter'")
    instruction = _text(where, prompt, "text")
    tree_id = str(obj.get("message_tree_id") or prompt.get("message_id") or label)
    replies = []
    for j, reply in enumerate(_list(where, prompt, "replies")):
        at = f"{where} (reply {j})"
        reply = _object(at, reply)
        if reply.get("role", "assistant") != "assistant" or reply.get("deleted") is True:
            continue
        replies.append(RankedReply(_text(at, reply, "text"), _rank(at, reply)))
    best = [r for r in replies if r.rank == 0]
    seeds = [Seed(tree_id, instruction, best[0].text)] if best else []
    ranked = RankedPrompt(tree_id, instruction, tuple(replies)) if any(r.rank is not None for r in replies) else None
    return seeds, ranked, None if best else "no_rank_0_reply"


def _self_instruct(where: str, obj: dict, label: str) -> Parsed:
    instruction = _text(where, obj, "instruction")
    base_id = str(obj.get("id") or obj.get("name") or label)
    instances = _list(where, obj, "instances")
    if not instances:
        raise SeedFormatError(f"{where}: 'instances' must hold at least one {{'input', 'output'}} object")
    seeds = []
    for k, inst in enumerate(instances):
        at = f"{where} (instance {k})"
        inst = _object(at, inst)
        seeds.append(Seed(base_id if len(instances) == 1 else f"{base_id}#{k}",
                          _with_input(instruction, _text(at, inst, "input", required=False)),
                          _text(at, inst, "output")))
    return seeds, None, None


def _alpaca(where: str, obj: dict, label: str) -> Parsed:
    instruction = _with_input(_text(where, obj, "instruction"), _text(where, obj, "input", required=False))
    return [Seed(str(obj.get("id", label)), instruction, _text(where, obj, "output"))], None, None


def _chat(where: str, obj: dict, label: str) -> Parsed:
    messages = _list(where, obj, "messages")
    user = None
    for j, m in enumerate(messages):
        at = f"{where} (message {j})"
        m = _object(at, m)
        role = m.get("role")
        if user is None and role == "user":
            user = _text(at, m, "content")
        elif user is not None and role == "assistant":
            return [Seed(str(obj.get("id", label)), user, _text(at, m, "content"))], None, None
    missing = "'user' message" if user is None else "'assistant' message after the first 'user' message"
    raise SeedFormatError(f"{where}: 'messages' has no {missing}")


PARSERS: dict[str, Callable[[str, dict, str], Parsed]] = {
    "flywheel": _flywheel, "oasst": _oasst, "self_instruct": _self_instruct, "alpaca": _alpaca, "chat": _chat}


def detect_format(path: Path, where: str, first: Any) -> str:
    """The format of a seed file, from its name and its first record's keys; SeedFormatError if it cannot tell."""
    name = path.name.removesuffix(".gz")
    if not name.endswith(SUFFIXES):
        raise SeedFormatError(f"{path}: cannot tell the seed format from the file name (expected one of "
                              f"{', '.join(SUFFIXES)}, optionally .gz); set seeds.format to one of "
                              f"{', '.join(FORMATS)}")
    keys = set(_object(where, first))
    if "messages" in keys:
        return "chat"
    if "message_tree_id" in keys or isinstance(first.get("prompt"), dict):
        return "oasst"
    if "instances" in keys:
        return "self_instruct"
    if "instruction" in keys:  # without 'output' it is taken as our own format, whose error names what is missing
        return "alpaca" if "output" in keys and "response" not in keys else "flywheel"
    raise SeedFormatError(f"{where}: cannot tell the seed format from the first record (keys: {sorted(keys)}); "
                          "expected 'instruction'+'response' (flywheel), 'prompt' trees (oasst), 'instances' (self_instruct), "
                          "'instruction'+'output' (alpaca) or 'messages' (chat); set seeds.format")


def _check_length(where: str, seeds: list[Seed], ranked: RankedPrompt | None, max_chars: int) -> None:
    texts = [("prompt", s.instruction) for s in seeds] + [("reply", s.response) for s in seeds]
    if ranked is not None:
        texts += [("prompt", ranked.instruction)] + [("reply", r.text) for r in ranked.replies]
    for what, text in texts:
        if len(text) > max_chars:
            raise SeedFormatError(f"{where}: a seed {what} of {len(text):,} characters, over seeds.max_chars "
                                  f"({max_chars:,}): shorten or drop the record, or raise seeds.max_chars")


def load_seed_data(path: str | Path, format: str = "auto", max_chars: int | None = None) -> SeedData:
    """Parse a seed file into IFT seeds and human-ranked replies; SeedFormatError names the bad record, and (with
    `max_chars`) a record whose prompt or a reply is longer than that."""
    path = Path(path)
    if not path.is_file():
        raise SeedFormatError(f"seed file not found: {path}")
    if format != "auto" and format not in PARSERS:
        raise SeedFormatError(f"unknown seed format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    records = _records(path)
    if not records:
        raise SeedFormatError(f"{path}: no seed records")
    if format == "auto":
        format = detect_format(path, records[0][0], records[0][2])
    parse = PARSERS[format]
    data = SeedData(path, format, [])
    for where, label, obj in records:
        seeds, ranked, skip = parse(where, _object(where, obj), label)
        if max_chars is not None:
            _check_length(where, seeds, ranked, max_chars)
        data.ift.extend(seeds)
        if ranked is not None:
            data.ranked.append(ranked)
        elif format == "oasst":
            data.unranked += 1
        if skip:
            data.skipped[skip] = data.skipped.get(skip, 0) + 1
    if not data.ift:
        raise SeedFormatError(f"{path}: no usable seed records (as {format}: {data.skipped or 'none found'})")
    return data


def load_seeds(path: str | Path, format: str = "auto") -> list[Seed]:
    """The IFT seeds of a seed file (see `load_seed_data`)."""
    return load_seed_data(path, format).ift


# --- M1's training data ----------------------------------------------------------------------------------------------
# One phrase per rubric point, in order: a tiny judge learns the additive structure from them.
POINT_PHRASES = [
    "The reply is on topic.",
    "It addresses a large part of the question.",
    "It usefully answers the core of the question.",
    "It is clear, direct and well organised.",
    "It is tailored to the question with nothing extraneous.",
]
NO_POINT_PHRASE = "The reply does not relate to the question."


def judge_target(points: int, verdict_only: bool = False) -> str:
    """The judge's answer for `points`: a short justification, then `Score: N`; with `verdict_only` (the
    probability judge, which reads the score right after 'Score:') the verdict alone."""
    if verdict_only:
        return f"Score: {points}"
    justification = " ".join(POINT_PHRASES[:points]) if points else NO_POINT_PHRASE
    return f"{justification}\nScore: {points}"


def ift_examples(seeds: list[Seed]) -> list[dict]:
    return [{"prompt": s.instruction, "completion": s.response} for s in seeds]


def eft_examples(seeds: list[Seed], judge_template: str, seed: int, verdict_only: bool = False) -> list[dict]:
    """Synthetic EFT, for seeds without human rankings: own answer 5, its first third 2, another seed's answer 0."""
    rng = random.Random(seed)
    out = []
    for s in seeds:
        words = s.response.split()
        replies = [(s.response, 5), (" ".join(words[: max(3, len(words) // 3)]), 2)]
        others = [o for o in seeds if o.response != s.response]
        if others:
            replies.append((rng.choice(others).response, 0))
        for reply, points in replies:
            prompt = judge_template.format(instruction=s.instruction, response=reply)  # judge.TEMPLATE_FIELDS
            out.append({"prompt": prompt, "completion": judge_target(points, verdict_only)})
    return out


def rank_points(rank: int, ranks: list[int]) -> int:
    """Points for a reply of human rank `rank` among a prompt's ranks (`ranks`, with repeats for ties).

    The humans' best reply gets 5 and their worst 2, with the ones between spread evenly and rounded half up
    (2 distinct ranks: 5, 2; 3: 5, 3, 2; 4: 5, 4, 3, 2). The floor is 2, not 0: every ranked Open Assistant reply is a
    human's attempt at the question, so it is on topic and partly answers it. A prompt's only ranked reply gets 5.
    The scale's bottom (0) is taught by off-topic replies (see `eft_from_rankings`)."""
    distinct = sorted(set(ranks))
    if len(distinct) == 1:
        return 5
    position = distinct.index(rank) / (len(distinct) - 1)
    return 5 - math.floor(3 * position + 0.5)


def balance_scores(examples: list[tuple[int, dict]], seed: int) -> list[tuple[int, dict]]:
    """Cap each score's examples at the median count over the scores present, sampled with `seed`; order is kept.

    The paper re-balanced its EFT set because one score (4) dominated; capping at the median cuts a dominant score
    down to a typical one and leaves the rarer ones whole."""
    by_score: dict[int, list[int]] = defaultdict(list)
    for i, (points, _) in enumerate(examples):
        by_score[points].append(i)
    if not by_score:
        return []
    cap = statistics.median_low(len(v) for v in by_score.values())
    rng = random.Random(seed)
    keep = {i for idx in by_score.values() for i in (idx if len(idx) <= cap else rng.sample(idx, cap))}
    return [e for i, e in enumerate(examples) if i in keep]


def eft_from_rankings(ranked: list[RankedPrompt], judge_template: str, seed: int, *,
                      balance: bool = True, verdict_only: bool = False) -> list[dict]:
    """EFT from human rankings: each ranked reply, scored by `rank_points`, and per prompt one reply to another
    prompt scored 0 (off topic); then `balance_scores`. Unranked replies are not used. Targets are `judge_target`."""
    rng = random.Random(seed)
    usable = [p for p in ranked if p.ranked_replies()]
    scored: list[tuple[int, dict]] = []
    for p in usable:
        replies = p.ranked_replies()
        ranks = [r.rank for r in replies]
        items = [(r.text, rank_points(r.rank, ranks)) for r in replies]
        others = [r.text for o in usable if o.instruction != p.instruction for r in o.ranked_replies()]
        if others:
            items.append((rng.choice(others), 0))
        for text, points in items:
            prompt = judge_template.format(instruction=p.instruction, response=text)
            scored.append((points, {"prompt": prompt, "completion": judge_target(points, verdict_only)}))
    if balance:
        scored = balance_scores(scored, seed)
    return [example for _, example in scored]


def pretrain_corpus(seeds: list[Seed], templates: list[str], seed: int) -> list[str]:
    """Unlabelled text for the tiny base model: the seeds as plain documents, task lists, and the template texts."""
    rng = random.Random(seed)
    docs = [f"Task: {s.instruction}\n{s.response}" for s in seeds]
    instructions = [s.instruction for s in seeds]
    for _ in range(len(seeds)):
        docs.append("\n".join(f"Task: {t}" for t in rng.sample(instructions, min(8, len(instructions)))))
    return docs + templates + [judge_target(p) for p in range(6)]
