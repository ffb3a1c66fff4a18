"""A verifiable instruction-following world for a real chat model: short tasks ("Describe the moon in plain words.")
with one to three of IFEval's verifiable instructions ("Answer with less than 60 words.", "Wrap your entire response
with double quotation marks."), checked by IFEval's own checkers (flywheel/analysis/ifeval.py).

    world = IFWorld(IFWorldSizes(seeds=200, pool=1000, test=300), seed=0)
    files = world.write(out_dir)   # seeds.jsonl, eft.jsonl, pool.jsonl, test.jsonl, stats.json

How a prompt is made (seeded, so the same seed and sizes write the same bytes): a topic (30, each with a title, a
yes/no question and eight plain sentences) and a task template (6), then 1-3 instruction ids drawn one at a time
from the 24 this world builds (all of IFEval's but `language:response_language`: responses are built in English),
never two that conflict: IFEval's `INSTRUCTION_CONFLICTS` (made symmetric), at most one layout (bullets, sections,
paragraphs, two responses, JSON, fixed answer), and two pairs no response can satisfy (lowercase with `Section`
headers; repeating a request whose instruction text holds a comma while using no commas). Each instruction's
arguments are drawn (keywords from IFEval's own word list or, for forbidden words, half the time from the topic's
sentences), and its text is the library's `build_description(**kwargs)`; `combination:repeat_prompt` comes last and
repeats the task and the instructions before it. The prompt is the task followed by the instruction texts.

Every prompt, in every split, comes with a proof that it can be followed: a response built from the topic's sentences
by applying each instruction (pick the sentences, drop those with forbidden words, add keywords, placeholders, capital
words and highlights, lay out bullets / sections / paragraphs / two responses / JSON, add title, repeated request,
postscript and end phrase, change case, drop commas, quote), trying a few sentence counts until IFEval's strict
checkers pass every instruction. A prompt with no such response is dropped (counted in `stats.json`: the yield).

Files:
- `seeds.jsonl`: Open Assistant trees (the seed format that carries ranked replies): the built response as rank 0
  (IFT, M1's SFT data), and, ranked below it by the share of instructions they follow (strict), the response built
  with one instruction left out and the plain answer with none applied. The seed loader turns the ranks into EFT
  judge-training examples (rank points 5 .. 2, plus an off-topic reply at 0: flywheel/stages/seeds.py).
- `eft.jsonl`: the same judgments written out as judge-training examples: `{"prompt": the judge template filled with
  the prompt and a reply, "completion": judge_target(points), "points", "followed"}`: 5 for a reply that follows
  every instruction, 2 + floor(3 x share followed) for one that follows some or none, 0 for another prompt's reply.
- `pool.jsonl`: prompts for the iterations (`self_instruct.prompts_file`), each with its `reference`: the JSON of
  its instruction ids and kwargs, which the rule reward `fraction_followed` checks.
- `test.jsonl`: the held-out set, in IFEval's format (`key`, `prompt`, `instruction_id_list`, `kwargs`), for
  `flywheel eval ifeval`. No prompt of it is in the seeds or the pool (checked when written).
- `stats.json`: per split, prompts drawn, kept, dropped (duplicates; no passing response, by instruction), the
  instruction ids and how many per prompt; the seeds' replies by share followed.

Rule rewards (`reward.rules`, kind `python`): `flywheel.analysis.ifworld:fraction_followed` (share of the prompt's
instructions followed, strict) and `flywheel.analysis.ifworld:all_followed` (1.0 when all are), from the reference.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pydantic import Field, model_validator

from ..config import _Section
from . import ifeval as ife

EXISTENCE = "keywords:existence"
FREQUENCY = "keywords:frequency"
FORBIDDEN = "keywords:forbidden_words"
LETTER = "keywords:letter_frequency"
LANGUAGE = "language:response_language"
SENTENCES = "length_constraints:number_sentences"
PARAGRAPHS = "length_constraints:number_paragraphs"
WORDS = "length_constraints:number_words"
NTH_PARAGRAPH = "length_constraints:nth_paragraph_first_word"
PLACEHOLDER = "detectable_content:number_placeholders"
POSTSCRIPT = "detectable_content:postscript"
BULLETS = "detectable_format:number_bullet_lists"
CONSTRAINED = "detectable_format:constrained_response"
HIGHLIGHTS = "detectable_format:number_highlighted_sections"
SECTIONS = "detectable_format:multiple_sections"
JSON_FORMAT = "detectable_format:json_format"
TITLE = "detectable_format:title"
TWO_RESPONSES = "combination:two_responses"
REPEAT = "combination:repeat_prompt"
END = "startend:end_checker"
CAPITAL_WORDS = "change_case:capital_word_frequency"
UPPER = "change_case:english_capital"
LOWER = "change_case:english_lowercase"
NO_COMMA = "punctuation:no_comma"
QUOTATION = "startend:quotation"

UNUSED = {LANGUAGE: "responses are built in English only"}
# At most one of these per prompt: each decides the response's whole layout.
LAYOUTS = (BULLETS, SECTIONS, PARAGRAPHS, NTH_PARAGRAPH, TWO_RESPONSES, JSON_FORMAT, CONSTRAINED)
# Pairs IFEval allows but no response can satisfy: an all-lowercase response has no `Section`/`SECTION` header;
# the text to repeat holds the no-comma instruction's own comma.
EXTRA_CONFLICTS = ((LOWER, SECTIONS), (REPEAT, NO_COMMA))
RELATIONS = ("less than", "at least")
MAX_SENTENCES = 8


def used_ids() -> list[str]:
    """The instruction ids this world draws (IFEval's 25 but those in UNUSED)."""
    return [i for i in ife.instruction_ids() if i not in UNUSED]


USED_IDS = used_ids()


def conflicts() -> dict[str, set[str]]:
    """Instruction id -> the ids it may not share a prompt with: IFEval's table made symmetric, plus the layouts
    and EXTRA_CONFLICTS."""
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_CONFLICTS

    out: dict[str, set[str]] = defaultdict(set)
    pairs = [(a, b) for a, bs in INSTRUCTION_CONFLICTS.items() for b in bs]
    pairs += [(a, b) for a in LAYOUTS for b in LAYOUTS] + list(EXTRA_CONFLICTS)
    for a, b in pairs:
        out[a] |= {a, b}
        out[b] |= {a, b}
    return dict(out)


class IFWorldSizes(_Section):
    """How many prompts of each split, and how many instructions a prompt has."""

    seeds: int = Field(200, ge=2, description="Seed prompts (IFT response + ranked worse replies for EFT).")
    pool: int = Field(1000, ge=1, description="Prompts for the iterations (self_instruct.prompts_file).")
    test: int = Field(300, ge=1, description="Held-out prompts, IFEval format.")
    min_instructions: int = Field(1, ge=1, le=3)
    max_instructions: int = Field(3, ge=1, le=3)

    @model_validator(mode="after")
    def _counts(self) -> "IFWorldSizes":
        if self.min_instructions > self.max_instructions:
            raise ValueError(f"min_instructions ({self.min_instructions}) is above max_instructions "
                             f"({self.max_instructions})")
        return self


@dataclass
class WorldPrompt:
    topic: int              # index into TOPICS
    task: str
    ids: list[str]
    kwargs: list[dict]      # canonical: what the built checker's get_instruction_args() returns ({} for none)
    prompt: str
    k: int                  # the body's preferred number of sentences
    style: int              # small choices of wording (postscript text, paragraph split)

    @property
    def reference(self) -> str:
        return json.dumps({"instruction_id_list": self.ids, "kwargs": self.kwargs}, sort_keys=True)

    def ifeval_record(self, key) -> dict:
        return {"key": key, "prompt": self.prompt, "instruction_id_list": self.ids, "kwargs": self.kwargs}


# --- drawing prompts ---------------------------------------------------------------------------------------------------
def _keyword_pool() -> list[str]:
    from if_verifiable.ifeval.instructions_util import WORD_LIST

    return sorted({w for w in WORD_LIST if w.isalpha() and w.islower() and 4 <= len(w) <= 10})


def topic_words(topic: Topic) -> list[str]:
    """The topic's content words (5+ letters), for forbidden words a response must then avoid."""
    return sorted({w for s in topic.sentences for w in re.findall(r"[a-z]+", s.lower()) if len(w) >= 5})


def _pick(rng: random.Random, pool: list[str], n: int, taken: set[str]) -> list[str]:
    words = rng.sample([w for w in pool if w not in taken], n)
    taken.update(words)
    return words


def draw_kwargs(iid: str, rng: random.Random, ids: list[str], topic: Topic, taken: set[str],
                keywords: list[str]) -> dict:
    """Arguments for one instruction (the repeat instruction's text is set later, from the prompt)."""
    rel = rng.choice(RELATIONS)
    if iid == EXISTENCE:
        return {"keywords": _pick(rng, keywords, 2, taken)}
    if iid == FREQUENCY:
        return {"keyword": _pick(rng, keywords, 1, taken)[0], "relation": rel,
                "frequency": rng.randint(1, 3) if rel == "at least" else rng.randint(2, 4)}
    if iid == FORBIDDEN:
        return {"forbidden_words": _pick(rng, topic_words(topic) if rng.random() < 0.5 else keywords, 2, taken)}
    if iid == LETTER:
        if rel == "at least":
            return {"letter": rng.choice("etaoinsr"), "let_frequency": rng.randint(3, 10), "let_relation": rel}
        return {"letter": rng.choice("jqxz"), "let_frequency": rng.randint(1, 4), "let_relation": rel}
    if iid == SENTENCES:
        return {"num_sentences": rng.randint(2, 6) if rel == "at least" else rng.randint(3, 8), "relation": rel}
    if iid == PARAGRAPHS:
        return {"num_paragraphs": rng.randint(2, 4)}
    if iid == WORDS:
        return {"num_words": rng.choice((20, 30, 40, 50, 60) if rel == "at least" else (40, 50, 60, 80, 100)),
                "relation": rel}
    if iid == NTH_PARAGRAPH:
        n = rng.randint(2, 4)
        return {"num_paragraphs": n, "nth_paragraph": rng.randint(1, n), "first_word": rng.choice(FIRST_WORDS)}
    if iid == PLACEHOLDER:
        return {"num_placeholders": rng.randint(1, 3)}
    if iid == POSTSCRIPT:
        return {"postscript_marker": rng.choice(("P.S.", "P.P.S"))}
    if iid == BULLETS:
        return {"num_bullets": rng.randint(2, 5)}
    if iid == HIGHLIGHTS:
        return {"num_highlights": rng.randint(1, 3)}
    if iid == SECTIONS:
        return {"section_spliter": "SECTION" if UPPER in ids else rng.choice(("Section", "SECTION")),
                "num_sections": rng.randint(2, 4)}
    if iid == END:
        return {"end_phrase": rng.choice(END_PHRASES)}
    if iid == CAPITAL_WORDS:
        return {"capital_frequency": rng.randint(1, 4) if rel == "at least" else rng.randint(2, 6),
                "capital_relation": rel}
    return {}


def join_texts(texts: list[str]) -> str:
    """The task and instruction texts as one prompt: a space after a sentence, a new line after a text that ends
    otherwise (the bullet instruction ends with its example list)."""
    out = texts[0]
    for t in texts[1:]:
        out += (" " if out.rstrip()[-1:] in ".?!)" else "\n") + t
    return out


def draw_prompt(rng: random.Random, sizes: IFWorldSizes, table: dict[str, set[str]], keywords: list[str]
                ) -> WorldPrompt:
    topic_index = rng.randrange(len(TOPICS))
    topic = TOPICS[topic_index]
    ids: list[str] = []
    for _ in range(rng.randint(sizes.min_instructions, sizes.max_instructions)):
        options = [i for i in USED_IDS if not any(i in table.get(c, ()) for c in ids)]
        if not options:
            break
        ids.append(rng.choice(options))
    ids.sort(key=lambda i: i == REPEAT)  # the request to repeat is everything before it
    task = topic.question if CONSTRAINED in ids else rng.choice(TASKS).format(name=topic.name)
    taken: set[str] = set()
    kwargs = [draw_kwargs(i, rng, ids, topic, taken, keywords) for i in ids]
    texts = [task]
    for iid, kw in zip(ids, kwargs):
        if iid == REPEAT:
            kw["prompt_to_repeat"] = join_texts(texts)
        texts.append(ife.describe(iid, kw))
    prompt = join_texts(texts)
    canonical = [ife.build_instruction(i, kw, prompt).get_instruction_args() or {} for i, kw in zip(ids, kwargs)]
    return WorldPrompt(topic_index, task, ids, canonical, prompt, k=rng.randint(2, 5), style=rng.randrange(6))


# --- building a response -----------------------------------------------------------------------------------------------
def _contains_word(text: str, word: str) -> bool:
    return re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE) is not None


def _usable(topic: Topic, active: dict[str, dict]) -> list[str]:
    """The topic's sentences a response with these instructions may use."""
    out = []
    for s in topic.sentences:
        if FORBIDDEN in active and any(_contains_word(s, w) for w in active[FORBIDDEN]["forbidden_words"]):
            continue
        kw = active.get(FREQUENCY)
        if kw and kw["relation"] == "less than" and kw["keyword"].lower() in s.lower():
            continue
        let = active.get(LETTER)
        if let and let["let_relation"] == "less than" and let["letter"] in s.lower():
            continue
        out.append(s)
    return out


def _groups(items: list[str], n: int) -> list[str]:
    """`items` in `n` contiguous groups as even as possible, each joined by spaces."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for g in range(n):
        end = start + size + (g < extra)
        out.append(" ".join(items[start:end]))
        start = end
    return out


def _shout(sentences: list[str], n: int) -> list[str]:
    """Capitalize `n` words (the longest of each sentence in turn, 4+ letters)."""
    words = [s.split(" ") for s in sentences]
    order = [sorted((j for j, w in enumerate(ws) if len(w.strip(".,?!")) >= 4 and w.strip(".,?!").isalpha()),
                    key=lambda j, ws=ws: -len(ws[j])) for ws in words]
    done = 0
    for depth in range(max((len(o) for o in order), default=0)):
        for ws, o in zip(words, order):
            if done < n and depth < len(o):
                ws[o[depth]] = ws[o[depth]].upper()
                done += 1
    return [" ".join(ws) for ws in words]


def _highlight(sentence: str) -> str:
    core = sentence.rstrip(".?!")
    return f"*{core}*{sentence[len(core):]}"


def assemble(wp: WorldPrompt, active: dict[str, dict], k: int) -> str | None:
    """The response to `wp` with the instructions in `active` applied and `k` of the topic's sentences as its body;
    None when there are not enough usable sentences for it."""
    topic = TOPICS[wp.topic]
    if CONSTRAINED in active:
        return f"My answer is {topic.answer}. {topic.sentences[0]}"
    usable = _usable(topic, active)
    if not 1 <= k <= len(usable):
        return None
    body = list(usable[:k])
    cap = active.get(CAPITAL_WORDS)
    if cap and cap["capital_relation"] == "at least":
        body = _shout(body, cap["capital_frequency"])
    if HIGHLIGHTS in active:
        n = active[HIGHLIGHTS]["num_highlights"]
        if n > len(body):
            return None
        body = [_highlight(s) if i < n else s for i, s in enumerate(body)]
    if EXISTENCE in active:
        body.append(EXISTENCE_TEMPLATE.format(words=" and ".join(active[EXISTENCE]["keywords"])))
    kw = active.get(FREQUENCY)
    if kw and kw["relation"] == "at least":
        body += [FREQUENCY_TEMPLATES[j % len(FREQUENCY_TEMPLATES)].format(w=kw["keyword"])
                 for j in range(kw["frequency"])]
    if PLACEHOLDER in active:
        body.append(PLACEHOLDER_TEMPLATE.format(marks=" ".join(PLACEHOLDERS[:active[PLACEHOLDER]["num_placeholders"]])))

    joiner = "\n\n"  # between the body and a title or postscript
    if BULLETS in active:
        n = active[BULLETS]["num_bullets"]
        if len(body) < n:
            return None
        mark = "- " if HIGHLIGHTS in active else "* "  # a '*' bullet would pair with a highlight's '*'
        text = "\n".join(mark + g for g in _groups(body, n))
    elif SECTIONS in active:
        n, name = active[SECTIONS]["num_sections"], active[SECTIONS]["section_spliter"]
        if len(body) < n:
            return None
        text = "\n\n".join(f"{name} {i + 1}\n{g}" for i, g in enumerate(_groups(body, n)))
    elif PARAGRAPHS in active:
        n = active[PARAGRAPHS]["num_paragraphs"]
        if len(body) < n:
            return None
        text, joiner = "\n\n***\n\n".join(_groups(body, n)), "\n"
    elif NTH_PARAGRAPH in active:
        a = active[NTH_PARAGRAPH]
        if len(body) < a["num_paragraphs"]:
            return None
        groups = _groups(body, a["num_paragraphs"])
        g = groups[a["nth_paragraph"] - 1]
        groups[a["nth_paragraph"] - 1] = a["first_word"].capitalize() + " " + g[:1].lower() + g[1:]
        text, joiner = "\n\n".join(groups), "\n"
    elif TWO_RESPONSES in active:
        if len(body) < 2:
            return None
        first, second = _groups(body, 2)
        text = f"{first}\n******\n{second}"
    elif JSON_FORMAT in active:
        text = json.dumps({"topic": topic.name, "answer": " ".join(body)}, indent=2)
    elif len(body) >= 4 and wp.style % 2:
        text = "\n\n".join(_groups(body, 2))
    else:
        text = " ".join(body)

    if TITLE in active:
        text = f"<<{topic.title}>>{joiner}{text}"
    if REPEAT in active:
        text = f"{active[REPEAT]['prompt_to_repeat']}\n\n{text}"
    if POSTSCRIPT in active:
        mark = active[POSTSCRIPT]["postscript_marker"]
        text += f"{joiner}{mark}{'' if mark.endswith('.') else '.'} {PS_TEXTS[wp.style % len(PS_TEXTS)]}"
    if END in active:
        text += " " + active[END]["end_phrase"]
    if LOWER in active:
        text = text.lower()
    if UPPER in active:
        text = text.upper()
    if NO_COMMA in active:
        text = text.replace(",", "")
    if QUOTATION in active:
        text = f'"{text}"'
    return text


def followed(wp: WorldPrompt, response: str) -> list[bool]:
    """IFEval's strict result for each of the prompt's instructions."""
    return ife.check_strict(wp.ids, wp.kwargs, wp.prompt, response)


def sentence_counts(k: int) -> list[int]:
    """k, then k+1, k-1, k+2, ... within 1..MAX_SENTENCES: the body sizes tried, nearest first."""
    out = [k]
    for d in range(1, MAX_SENTENCES):
        out += [c for c in (k + d, k - d) if 1 <= c <= MAX_SENTENCES]
    return out


def build_response(wp: WorldPrompt) -> tuple[str | None, list[str]]:
    """(a response that follows every instruction, strict), or (None, the ids that failed at the preferred size)."""
    active = dict(zip(wp.ids, wp.kwargs))
    failed: list[str] | None = None
    for k in sentence_counts(wp.k):
        text = assemble(wp, active, k)
        if text is None:
            continue
        ok = followed(wp, text)
        if all(ok):
            return text, []
        if failed is None:
            failed = [i for i, good in zip(wp.ids, ok) if not good]
    return None, failed or ["no_usable_sentences"]


def worse_replies(wp: WorldPrompt, rng: random.Random) -> list[tuple[str, float]]:
    """Replies that follow fewer instructions, with the share they follow: the response built with one instruction
    (drawn) left out, and the plain answer with none applied. Replies that follow all, or repeat another, are left
    out."""
    active = dict(zip(wp.ids, wp.kwargs))
    out: dict[str, float] = {}
    leave = rng.choice(wp.ids)
    candidates = []
    if len(wp.ids) > 1:
        candidates.append({i: kw for i, kw in active.items() if i != leave})
    candidates.append({})
    for partial in candidates:
        text = next((t for k in sentence_counts(wp.k) if (t := assemble(wp, partial, k)) is not None), None)
        if text is None or text in out:
            continue
        ok = followed(wp, text)
        share = sum(ok) / len(ok)
        if share < 1:
            out[text] = share
    return sorted(out.items(), key=lambda kv: -kv[1])


def eft_points(share: float) -> int:
    """Judge points for a reply that follows `share` of its instructions: 5 for all, else 2 + floor(3 x share)."""
    return 5 if share >= 1 else 2 + math.floor(3 * share)


# --- the world ---------------------------------------------------------------------------------------------------------
class IFWorld:
    def __init__(self, sizes: IFWorldSizes, seed: int):
        self.sizes, self.seed = sizes, seed

    def splits(self) -> tuple[dict[str, list[tuple[WorldPrompt, str]]], dict]:
        """Disjoint splits of feasible prompts, each with the response that proves it, the test set drawn first;
        and the drawing's statistics."""
        s = self.sizes
        rng = random.Random(f"ifworld-prompts-{self.seed}")
        table, keywords = conflicts(), _keyword_pool()
        seen: set[str] = set()
        out: dict[str, list[tuple[WorldPrompt, str]]] = {}
        stats: dict = {}
        for split, n in (("test", s.test), ("seeds", s.seeds), ("pool", s.pool)):
            kept: list[tuple[WorldPrompt, str]] = []
            drawn, duplicates, failed = 0, 0, Counter()
            while len(kept) < n:
                if drawn >= 20 * n + 200:
                    raise ValueError(f"ifworld: only {len(kept)} of {n} {split} prompts after {drawn} draws "
                                     f"({duplicates} repeats, {sum(failed.values())} with no passing response); "
                                     "ask for fewer")
                drawn += 1
                wp = draw_prompt(rng, s, table, keywords)
                if wp.prompt in seen:
                    duplicates += 1
                    continue
                seen.add(wp.prompt)
                response, bad = build_response(wp)
                if response is None:
                    failed.update(bad)
                    continue
                kept.append((wp, response))
            out[split] = kept
            stats[split] = {"drawn": drawn, "kept": len(kept), "duplicates": duplicates,
                            "no_passing_response": drawn - duplicates - len(kept),
                            "yield": round(len(kept) / (drawn - duplicates), 4),
                            "failed_instructions": dict(sorted(failed.items())),
                            "instructions": dict(sorted(Counter(i for wp, _ in kept for i in wp.ids).items())),
                            "instructions_per_prompt": dict(sorted(Counter(str(len(wp.ids)) for wp, _ in kept).items())),
                            "topics": len({wp.topic for wp, _ in kept})}
        return out, stats

    def write(self, out: Path, judge_template: str | Path | None = None, verdict_only: bool = False
              ) -> dict[str, Path]:
        """Write the world's files under `out` (same seed and sizes: same bytes) and return their paths."""
        from ..config import JudgeConfig
        from ..stages.seeds import judge_target

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        splits, stats = self.splits()
        prompts = {name: [wp.prompt for wp, _ in rows] for name, rows in splits.items()}
        assert not set(prompts["test"]) & (set(prompts["seeds"]) | set(prompts["pool"])), "test overlaps training"
        assert not set(prompts["seeds"]) & set(prompts["pool"]), "seeds overlap the pool"
        template = Path(judge_template or JudgeConfig().template).read_text()

        rng = random.Random(f"ifworld-replies-{self.seed}")
        seeds, eft = [], []
        shares: Counter = Counter()
        responses = [r for _, r in splits["seeds"]]
        for i, (wp, response) in enumerate(splits["seeds"]):
            worse = worse_replies(wp, rng)
            ranks = {share: r + 1 for r, share in enumerate(sorted({s for _, s in worse}, reverse=True))}
            replies = [{"text": response, "role": "assistant", "rank": 0, "followed": 1.0}]
            replies += [{"text": t, "role": "assistant", "rank": ranks[s], "followed": round(s, 4)} for t, s in worse]
            seeds.append({"message_tree_id": f"ifworld-{self.seed}-{i}",
                          "prompt": {"text": wp.prompt, "role": "prompter", "replies": replies}})
            others = [r for j, r in enumerate(responses) if j != i and r != response]
            judged = [(response, 1.0)] + worse + [(rng.choice(others), None)]
            for text, share in judged:
                points = 0 if share is None else eft_points(share)
                shares[str(points)] += 1
                eft.append({"prompt": template.format(instruction=wp.prompt, response=text),
                            "completion": judge_target(points, verdict_only), "points": points,
                            "followed": None if share is None else round(share, 4)})
        stats["eft_points"] = dict(sorted(shares.items()))
        stats["seed"], stats["sizes"] = self.seed, self.sizes.model_dump()
        stats["instruction_ids_used"] = sorted({i for rows in splits.values() for wp, _ in rows for i in wp.ids})
        stats["instruction_ids_unused"] = {i: UNUSED.get(i, "never drawn") for i in ife.instruction_ids()
                                           if i not in stats["instruction_ids_used"]}

        files = {"seeds": out / "seeds.jsonl", "eft": out / "eft.jsonl", "pool": out / "pool.jsonl",
                 "test": out / "test.jsonl", "stats": out / "stats.json"}
        _jsonl(files["seeds"], seeds)
        _jsonl(files["eft"], eft)
        _jsonl(files["pool"], [{"prompt": wp.prompt, "reference": wp.reference} for wp, _ in splits["pool"]])
        _jsonl(files["test"], [wp.ifeval_record(i) for i, (wp, _) in enumerate(splits["test"])])
        files["stats"].write_text(json.dumps(stats, indent=1) + "\n")
        return files


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# --- the rule reward ---------------------------------------------------------------------------------------------------
def _reference(reference: str | dict | None) -> tuple[list[str], list[dict]]:
    if reference is None:
        raise ValueError("this rule needs the prompt's reference (the JSON of its instruction ids and kwargs, as "
                         "ifworld's pool.jsonl gives it)")
    spec = json.loads(reference) if isinstance(reference, str) else reference
    ids, kwargs = spec.get("instruction_id_list"), spec.get("kwargs")
    if not isinstance(ids, list) or not ids or not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(f"reference {str(reference)[:80]!r} has no 'instruction_id_list' with one 'kwargs' each")
    return ids, kwargs


def fraction_followed(prompt: str, response: str, reference: str | dict | None) -> float:
    """Rule reward (`kind: python`, `checker: flywheel.analysis.ifworld:fraction_followed`): the share of the
    instructions in the reference that the response follows, by IFEval's strict check."""
    ids, kwargs = _reference(reference)
    ok = ife.check_strict(ids, kwargs, prompt, response)
    return sum(ok) / len(ok)


def all_followed(prompt: str, response: str, reference: str | dict | None) -> float:
    """Rule reward: 1.0 when the response follows every instruction in the reference (strict), else 0.0."""
    return float(fraction_followed(prompt, response, reference) == 1.0)


def checklist(prompt: str, reference: str | dict | None) -> list[str]:
    """The judge's checklist in verify mode (`judge.checklist: flywheel.analysis.ifworld:checklist`): one requirement
    per instruction in the reference, the library's text of it (`ifeval.describe`, as the prompt states it)."""
    ids, kwargs = _reference(reference)
    return [ife.describe(i, k, prompt) for i, k in zip(ids, kwargs)]


# --- content -----------------------------------------------------------------------------------------------------------
# The sentences are written to be transformed by instructions: no word in capitals (not even "I"), no `*`, `[`, `]`,
# `<`, `>` or double quotes, no abbreviations with a period, few commas.
class Topic(NamedTuple):
    name: str            # as it reads inside a task: "Write a short note about {name}."
    title: str           # the response's title, when one is asked for
    question: str        # a yes/no question about it (for `detectable_format:constrained_response`)
    answer: str          # "yes" | "no"
    sentences: tuple[str, ...]


TASKS = (
    "Write a short note about {name}.",
    "Explain {name} to a curious child.",
    "Describe {name} in plain words.",
    "Tell me some facts about {name}.",
    "Give a brief overview of {name}.",
    "Write a short blog post about {name}.",
)

TOPICS = (
    Topic("the ocean", "The Deep Blue Ocean", "Is most of the surface of the Earth covered by the ocean?", "yes", (
        "The ocean covers most of the surface of our planet.",
        "Its water is salty because rivers carry minerals into it over millions of years.",
        "Tides rise and fall twice a day because the moon pulls on the water.",
        "Many creatures live in the ocean, from tiny plankton to huge whales.",
        "The deepest parts of the ocean are dark and very cold.",
        "Ocean currents move warm water toward the poles and cold water back.",
        "Coral reefs grow in shallow tropical seas and shelter many fish.",
        "People depend on the ocean for food and for trade routes.",
    )),
    Topic("honey bees", "Busy Honey Bees", "Do honey bees make honey from nectar?", "yes", (
        "Honey bees live together in large colonies inside a hive.",
        "Each colony has one queen who lays thousands of eggs.",
        "Worker bees collect nectar and pollen from flowers.",
        "They turn the nectar into honey and store it in wax cells.",
        "Bees share the location of flowers through a special dance.",
        "While they visit flowers they carry pollen from plant to plant.",
        "This pollination helps many fruits and vegetables grow.",
        "A healthy hive can hold tens of thousands of bees in summer.",
    )),
    Topic("the moon", "Our Silver Moon", "Does the moon make its own light?", "no", (
        "The moon is the only natural satellite of our planet.",
        "It shines because it reflects light from the sun.",
        "The same side of the moon always faces us.",
        "Its surface is covered with dust and craters from old impacts.",
        "The moon takes about a month to travel around the planet.",
        "Its changing shape in the sky is called its phases.",
        "The pull of the moon causes the tides in the sea.",
        "People first walked on the moon more than fifty years ago.",
    )),
    Topic("volcanoes", "Fire Mountains", "Can volcanoes form under the sea?", "yes", (
        "A volcano is an opening in the crust where melted rock escapes.",
        "Melted rock below the ground is called magma.",
        "Once it reaches the surface the same rock is called lava.",
        "Some volcanoes erupt gently while others explode with great force.",
        "Ash from a large eruption can travel across whole continents.",
        "Over time layers of lava and ash build tall mountains.",
        "Many volcanoes sit along the edges of moving plates in the crust.",
        "Scientists watch small earthquakes and gases to predict eruptions.",
    )),
    Topic("rainforests", "Green Rainforests", "Do rainforests get a lot of rain?", "yes", (
        "Rainforests are thick forests that get heavy rain most of the year.",
        "They are home to more kinds of plants and animals than any other land.",
        "Tall trees form a roof of leaves called the canopy.",
        "Little sunlight reaches the ground below the canopy.",
        "Many medicines come from plants that grow in rainforests.",
        "The trees take in carbon and release oxygen into the air.",
        "Large areas of rainforest are cut down for farms and timber.",
        "Protecting these forests helps keep the climate stable.",
    )),
    Topic("bicycles", "Life on Two Wheels", "Does riding a bicycle burn fuel?", "no", (
        "A bicycle is a simple machine with two wheels and pedals.",
        "The rider pushes the pedals to turn a chain and the back wheel.",
        "Gears make it easier to climb hills or go fast on flat roads.",
        "Riding a bicycle is good exercise for the heart and legs.",
        "Bicycles do not burn fuel and make no smoke.",
        "Many cities build special lanes to keep cyclists safe.",
        "A helmet protects the head in case of a fall.",
        "With a little care a good bicycle can last for many years.",
    )),
    Topic("coffee", "The Story of Coffee", "Is coffee made from roasted beans?", "yes", (
        "Coffee is a drink made from the roasted seeds of a small tree.",
        "The seeds are often called beans even though they are not beans.",
        "Coffee trees grow best in warm places near the equator.",
        "Roasting turns the green seeds brown and brings out their flavor.",
        "The beans are ground and mixed with hot water to make the drink.",
        "Coffee contains caffeine which can help people feel awake.",
        "Too much caffeine can make it hard to sleep at night.",
        "People around the world drink coffee at breakfast and with friends.",
    )),
    Topic("the human heart", "The Tireless Heart", "Does the heart pump blood around the body?", "yes", (
        "The heart is a strong muscle about the size of a fist.",
        "It pumps blood through the body without ever taking a rest.",
        "Blood carries oxygen and food to every part of the body.",
        "The heart has four chambers that work in a steady rhythm.",
        "An adult heart beats around seventy times each minute at rest.",
        "Regular exercise makes the heart stronger over time.",
        "Healthy food and enough sleep also help the heart.",
        "Doctors listen to the heart to check that it works well.",
    )),
    Topic("libraries", "The Quiet Library", "Can people borrow books from a public library?", "yes", (
        "A library is a place where people can read and borrow books.",
        "Public libraries are usually free for everyone in the town.",
        "Librarians help visitors find the books and facts they need.",
        "Many libraries also lend films and music and offer computers.",
        "Children often come to listen to stories read aloud.",
        "Books are arranged by subject so they are easy to find.",
        "Quiet rooms give students a calm place to study.",
        "Libraries keep old records that tell the history of a place.",
    )),
    Topic("recycling", "Give Waste a Second Life", "Can glass be recycled?", "yes", (
        "Recycling turns used materials into new products.",
        "Paper and glass and metal can all be recycled.",
        "Sorting waste at home makes recycling much easier.",
        "Recycling saves energy compared with making things from raw materials.",
        "It also means less waste ends up buried in the ground.",
        "Old bottles can become new bottles again and again.",
        "Food scraps can be turned into rich soil through composting.",
        "Using fewer things in the first place helps even more.",
    )),
    Topic("sleep", "Why We Sleep", "Do children need more sleep than adults?", "yes", (
        "Sleep gives the body and the mind time to rest and repair.",
        "Most adults need seven to nine hours of sleep each night.",
        "Children and teenagers need even more sleep than adults.",
        "During sleep the brain sorts and stores memories from the day.",
        "A dark and quiet room makes it easier to fall asleep.",
        "Bright screens late at night can keep people awake.",
        "Going to bed at the same time each day builds a healthy habit.",
        "Without enough sleep it is hard to focus and stay cheerful.",
    )),
    Topic("chess", "The Game of Kings", "Does each chess player start with sixteen pieces?", "yes", (
        "Chess is a board game for two players.",
        "Each player starts with sixteen pieces on a board of sixty four squares.",
        "The goal is to trap the king of the other player.",
        "Every kind of piece moves in its own way.",
        "The knight is the only piece that can jump over others.",
        "Good players plan several moves ahead.",
        "The game has been played for more than a thousand years.",
        "Playing chess can improve memory and patience.",
    )),
    Topic("bread baking", "Baking Bread at Home", "Does yeast help bread rise?", "yes", (
        "Bread is made from flour and water and a little salt.",
        "Yeast is added to make the dough rise.",
        "The yeast eats sugar and gives off gas that forms bubbles.",
        "Kneading the dough makes it smooth and stretchy.",
        "The dough rests in a warm place until it doubles in size.",
        "Baking in a hot oven gives the loaf a golden crust.",
        "Fresh bread smells wonderful when it comes out of the oven.",
        "Letting the loaf cool before cutting keeps it from getting gummy.",
    )),
    Topic("the water cycle", "The Endless Water Cycle", "Does water evaporate when the sun heats it?", "yes", (
        "The water cycle is the constant movement of water on our planet.",
        "The sun heats water in oceans and lakes until it evaporates.",
        "The water vapor rises and cools to form clouds.",
        "When the drops in clouds grow heavy they fall as rain or snow.",
        "Rain soaks into the ground or flows into rivers.",
        "Rivers carry the water back to the sea.",
        "Plants also release water into the air through their leaves.",
        "The same water has been moving around this cycle for ages.",
    )),
    Topic("electric cars", "Driving on Electricity", "Do electric cars need petrol?", "no", (
        "Electric cars run on batteries instead of petrol.",
        "They are charged by plugging them into a power outlet.",
        "An electric motor turns the wheels quietly and smoothly.",
        "These cars give off no exhaust while they drive.",
        "Charging at home overnight is cheap for many owners.",
        "Long trips need planning because charging takes time.",
        "Batteries have improved a lot and now last for many miles.",
        "More charging stations are being built every year.",
    )),
    Topic("deserts", "Life in the Desert", "Do deserts get very little rain?", "yes", (
        "A desert is a place that gets very little rain.",
        "Some deserts are hot while others are cold.",
        "Days can be very hot and nights surprisingly cold.",
        "Cactus plants store water in their thick stems.",
        "Many desert animals rest in the shade during the day.",
        "Camels can travel for days without drinking.",
        "Wind shapes the sand into tall dunes.",
        "Rare rains can make the desert bloom with flowers.",
    )),
    Topic("owls", "Silent Hunters of the Night", "Are most owls active at night?", "yes", (
        "Owls are birds that usually hunt at night.",
        "Their large eyes help them see in the dark.",
        "They can turn their heads much farther than people can.",
        "Soft feathers let owls fly almost without a sound.",
        "Owls hear very well and can find prey by sound alone.",
        "They eat mice and insects and sometimes fish.",
        "Most owls nest in hollow trees or old buildings.",
        "In many stories the owl stands for wisdom.",
    )),
    Topic("the piano", "The Grand Piano", "Does a piano make sound with hammers and strings?", "yes", (
        "The piano is a musical instrument played with a keyboard.",
        "Pressing a key makes a small hammer strike a string.",
        "A standard piano has eighty eight keys.",
        "The white and black keys play different notes.",
        "Pedals let the player hold notes or make them softer.",
        "The piano can play both melody and harmony at once.",
        "Learning the piano takes patience and daily practice.",
        "Many famous composers wrote their best music for the piano.",
    )),
    Topic("gardening", "A Garden of One's Own", "Do most plants need sunlight to grow?", "yes", (
        "Gardening means growing plants for food or for beauty.",
        "Most plants need sunlight and water and good soil.",
        "Seeds are planted in spring when the ground warms up.",
        "Weeds should be pulled so they do not crowd the plants.",
        "Compost adds food for plants to the soil.",
        "Some vegetables can be picked just a few weeks after planting.",
        "Flowers in a garden attract bees and butterflies.",
        "Spending time in a garden can be calm and relaxing.",
    )),
    Topic("rainbows", "Colors in the Sky", "Can a rainbow appear when the sun shines through rain?", "yes", (
        "A rainbow is an arc of colors that appears in the sky.",
        "It forms when sunlight shines through drops of rain.",
        "Each drop bends the light and splits it into colors.",
        "The colors always appear in the same order.",
        "Red is on the outside of the arc and violet is on the inside.",
        "To see a rainbow the sun must be behind the viewer.",
        "Sometimes a fainter second rainbow appears above the first.",
        "Rainbows can also form in the spray of a waterfall.",
    )),
    Topic("penguins", "Penguins on the Ice", "Can penguins fly through the air?", "no", (
        "Penguins are birds that cannot fly.",
        "They use their wings as flippers to swim fast.",
        "Most penguins live in the cold southern half of the world.",
        "A thick layer of fat keeps them warm in icy water.",
        "Penguins eat fish and squid and tiny shrimp.",
        "Many kinds gather in huge groups to raise their chicks.",
        "Parents take turns keeping the egg warm.",
        "On land penguins waddle or slide on their bellies.",
    )),
    Topic("the internet", "A Web of Connections", "Does the internet connect computers around the world?", "yes", (
        "The internet is a huge network that links computers around the world.",
        "It lets people send messages and share files in seconds.",
        "Websites are pages of information stored on distant computers.",
        "Search engines help people find what they are looking for.",
        "Data travels through cables under the sea and through the air.",
        "The internet has changed how people work and learn.",
        "Strong passwords help keep accounts safe.",
        "Not everything online is true so it is wise to check sources.",
    )),
    Topic("earthquakes", "When the Ground Shakes", "Can scientists predict the exact day of an earthquake?", "no", (
        "An earthquake is a sudden shaking of the ground.",
        "It happens when large plates of rock slip past each other.",
        "The point where the slip begins is deep below the surface.",
        "Strong earthquakes can damage buildings and roads.",
        "Scientists measure earthquakes with sensitive instruments.",
        "Safe buildings are designed to sway without falling.",
        "During a quake it is safest to get under a sturdy table.",
        "Nobody can yet predict the exact day of an earthquake.",
    )),
    Topic("tea", "A Cup of Tea", "Is green tea made from the same plant as black tea?", "yes", (
        "Tea is a drink made by soaking leaves in hot water.",
        "Most tea comes from the leaves of one kind of bush.",
        "Green tea and black tea come from the same plant.",
        "The leaves are processed in different ways to change the taste.",
        "Tea has been enjoyed for thousands of years.",
        "Some people add milk or lemon or honey to their tea.",
        "Herbal drinks made from flowers are often called tea too.",
        "Sharing a pot of tea is a friendly custom in many places.",
    )),
    Topic("mountains", "Among the Peaks", "Does the air get thinner high on a mountain?", "yes", (
        "Mountains are large landforms that rise high above the land around them.",
        "Most mountains form when plates in the crust push together.",
        "The air gets thinner and colder as you climb higher.",
        "Snow can stay on the highest peaks all year long.",
        "Mountain goats are skilled climbers on steep rocks.",
        "Rivers often begin as streams high in the mountains.",
        "Hikers should carry water and warm clothes.",
        "The view from the top can stretch for many miles.",
    )),
    Topic("friendship", "The Gift of Friendship", "Can friendship make people happier?", "yes", (
        "Friendship is a close bond between people who care about each other.",
        "Good friends listen and offer help in hard times.",
        "Friends share laughter and make good times better.",
        "Trust grows slowly through honesty and kindness.",
        "Spending time together keeps a friendship strong.",
        "Friends do not always agree and that is fine.",
        "Saying sorry after a mistake can mend a friendship.",
        "Studies suggest that strong friendships make people happier.",
    )),
    Topic("trains", "Riding the Rails", "Do trains run on tracks?", "yes", (
        "Trains are vehicles that run on metal rails.",
        "Early trains were pulled by steam engines that burned coal.",
        "Many modern trains run on electricity.",
        "Trains can carry many passengers at once.",
        "Freight trains move heavy goods across long distances.",
        "High speed trains can travel faster than most cars.",
        "Train travel uses less fuel per person than flying.",
        "Stations are often busy places at the center of a town.",
    )),
    Topic("clouds", "Reading the Clouds", "Are clouds made of tiny drops of water?", "yes", (
        "Clouds are made of tiny drops of water or bits of ice.",
        "They form when warm moist air rises and cools.",
        "Fluffy white clouds often mean fair weather.",
        "Dark heavy clouds can bring rain or storms.",
        "Thin wispy clouds float very high in the sky.",
        "Fog is simply a cloud that sits near the ground.",
        "Clouds help keep the planet warm at night.",
        "Watching clouds can help people guess the weather.",
    )),
    Topic("exercise", "Moving for Health", "Is regular exercise good for the heart?", "yes", (
        "Exercise is any activity that makes the body work harder.",
        "Walking and swimming and dancing are all good exercise.",
        "Regular exercise makes the heart and lungs stronger.",
        "It also helps build strong muscles and bones.",
        "Many people feel happier after a good workout.",
        "Stretching before and after exercise helps prevent injuries.",
        "Drinking water keeps the body going during activity.",
        "Even short daily walks can improve health.",
    )),
    Topic("the sun", "Our Nearest Star", "Is the sun a star?", "yes", (
        "The sun is the star at the center of our solar system.",
        "It is a giant ball of hot glowing gas.",
        "Its light takes about eight minutes to reach our planet.",
        "The sun gives the warmth and light that life needs.",
        "Plants use sunlight to make their own food.",
        "Looking straight at the sun can hurt the eyes.",
        "The sun is much larger than any planet around it.",
        "It will keep shining for billions of years.",
    )),
)

# Texts a response is assembled with (beside the topic's sentences).
PS_TEXTS = ("Thanks for reading.", "Hope this was useful.", "Feel free to ask for more.")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?", "Hope this helps.",
               "That is all for now.")
FIRST_WORDS = ("also", "overall", "today", "however", "finally", "indeed", "still", "moreover")
PLACEHOLDERS = ("[name]", "[date]", "[place]", "[time]", "[address]")
FREQUENCY_TEMPLATES = ("Think about {w}.", "The word {w} matters here.", "Keep {w} in mind.", "Remember {w} too.")
EXISTENCE_TEMPLATE = "This also brings to mind {words}."
PLACEHOLDER_TEMPLATE = "Fill in the details here: {marks}."
