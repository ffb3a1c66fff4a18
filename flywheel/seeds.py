"""Seed data: the human-written tasks the flywheel starts from.

Format (JSON Lines, one object per line; `seeds/demo.jsonl` is the shipped set):
    {"id": "seed-001", "instruction": "What is a noun?", "response": "A noun is a word that names ..."}
`instruction` and `response` are required non-empty strings; `id` defaults to the line number; other keys (such as
`category`) are ignored. A malformed line raises `SeedFormatError` naming the file and line.

From the seeds we make M1's training data, as the paper does (IFT + EFT):
- IFT: (instruction -> response) chat examples.
- EFT: judge-training examples: the judge prompt filled with an instruction and a reply, answered by a short
  justification and `Score: N`. With no human-ranked replies to hand, we make replies of known quality from the seeds:
  the seed's own answer (5 points), its first third (2: on topic, partial), another seed's answer (0: off topic).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


class SeedFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Seed:
    id: str
    instruction: str
    response: str


def load_seeds(path: str | Path) -> list[Seed]:
    path = Path(path)
    if not path.is_file():
        raise SeedFormatError(f"seed file not found: {path}")
    seeds: list[Seed] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SeedFormatError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise SeedFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("instruction", "response"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise SeedFormatError(f"{where}: '{key}' must be a non-empty string")
        seeds.append(Seed(str(obj.get("id", f"line-{lineno}")), obj["instruction"].strip(), obj["response"].strip()))
    if not seeds:
        raise SeedFormatError(f"{path}: no seed records")
    return seeds


# One phrase per rubric point, in order: a tiny judge learns the additive structure from them.
POINT_PHRASES = [
    "The reply is on topic.",
    "It addresses a large part of the question.",
    "It usefully answers the core of the question.",
    "It is clear, direct and well organised.",
    "It is tailored to the question with nothing extraneous.",
]
NO_POINT_PHRASE = "The reply does not relate to the question."


def judge_target(points: int) -> str:
    justification = " ".join(POINT_PHRASES[:points]) if points else NO_POINT_PHRASE
    return f"{justification}\nScore: {points}"


def ift_examples(seeds: list[Seed]) -> list[dict]:
    return [{"prompt": s.instruction, "completion": s.response} for s in seeds]


def eft_examples(seeds: list[Seed], judge_template: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for s in seeds:
        words = s.response.split()
        replies = [(s.response, 5), (" ".join(words[: max(3, len(words) // 3)]), 2)]
        others = [o for o in seeds if o.response != s.response]
        if others:
            replies.append((rng.choice(others).response, 0))
        for reply, points in replies:
            prompt = judge_template.format(instruction=s.instruction, response=reply)
            out.append({"prompt": prompt, "completion": judge_target(points)})
    return out


def pretrain_corpus(seeds: list[Seed], templates: list[str], seed: int) -> list[str]:
    """Unlabelled text for the tiny base model: the seeds as plain documents, task lists, and the template texts."""
    rng = random.Random(seed)
    docs = [f"Task: {s.instruction}\n{s.response}" for s in seeds]
    instructions = [s.instruction for s in seeds]
    for _ in range(len(seeds)):
        docs.append("\n".join(f"Task: {t}" for t in rng.sample(instructions, min(8, len(instructions)))))
    return docs + templates + [judge_target(p) for p in range(6)]
