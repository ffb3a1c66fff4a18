"""A verifiable mini-world: sorting short lists of digits, a task whose every answer is known and that a tiny model
trained from scratch on 2 CPU cores partly learns in a couple of minutes.

    world = SortWorld(WorldSizes(), seed=0)
    files = world.write(out_dir)     # corpus.txt, seeds.jsonl, pool.jsonl, test.jsonl

A problem is `Sort the digits 72941.` and its answer `12479`. Lists have 3 to `max_len`
digits, each length equally likely: short lists are learned first and long ones later, so a model in training is
partly right (about 70% after 700 pretraining steps, 10% of the 9-digit lists) rather than all right or all wrong.

Every problem is drawn once and lands in exactly one file:
- `test.jsonl`: the held-out set; no other file holds these lists, and pretraining never sees them.
- `seeds.jsonl`: the seed data, in the Open Assistant format the seed loader reads: the true answer as the rank-0
  reply (IFT: the SFT data of M1) and a near miss as rank 1. With the off-topic reply the loader adds, that is EFT:
  the judge learns 5 points for a sorted list, 2 for a wrong one, 0 for the answer to another list.
- `pool.jsonl`: the new prompts of the iterations, with references (`self_instruct.prompts_file`).
- `corpus.txt`: unlabeled text for pretraining (`model.tiny.corpus`): lines `72941>12479`, and (a `question_share` of
  them) questions followed by their answer, as text on the web mixes bare facts and Q&A.

`exact_match` is the ground truth: the rule reward of the oracle run and the metric of `flywheel experiment`.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from pydantic import Field, model_validator

from ..config import _Section

_PROMPT = re.compile(r"^\s*Sort the digits (\d+)\.\s*$")
_DIGITS = re.compile(r"\d+")


class WorldSizes(_Section):
    """The world's shape and how many problems of each kind (`world:` in an experiment config)."""

    min_len: int = Field(3, ge=2, description="Fewest digits in a list.")
    max_len: int = Field(9, ge=2, le=30, description="Most digits in a list.")
    corpus_docs: int = Field(4000, ge=1, description="Pretraining documents of `lines_per_doc` sorted lists.")
    lines_per_doc: int = Field(12, ge=1)
    question_share: float = Field(0.5, ge=0, le=1, description="Share of the corpus's lists written as a question "
                                  "and its answer rather than as a line `72941>12479`.")
    seeds: int = Field(200, ge=2, description="Seed problems (IFT answer + a near miss for EFT).")
    pool: int = Field(1000, ge=1, description="New prompts for the iterations (each used once per run).")
    test: int = Field(300, ge=1, description="Held-out problems, never trained on.")

    @model_validator(mode="after")
    def _lengths(self) -> "WorldSizes":
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) is above max_len ({self.max_len})")
        return self


def prompt_of(digits: str) -> str:
    return f"Sort the digits {digits}."


def solution_of(digits: str) -> str:
    return "".join(sorted(digits))


def line_of(digits: str) -> str:
    """A pretraining line: the list, '>', the list sorted."""
    return f"{digits}>{solution_of(digits)}"


def parse_prompt(text: str) -> str | None:
    """The digits a prompt asks to sort, or None when it is not a sorting prompt."""
    m = _PROMPT.match(text)
    return m.group(1) if m else None


def final_answer(response: str) -> str | None:
    """What the response gives as sorted: the digits after its last '>' (the whole response when it has none), if
    that is exactly one run of digits; else None. '12479' and '72941>12479' give '12479'; '124 79' gives None."""
    tail = response.rsplit(">", 1)[-1].strip()
    return tail if _DIGITS.fullmatch(tail) else None


def is_correct(response: str, reference: str) -> bool:
    return final_answer(response) == reference.strip()


def exact_match(prompt: str, response: str, reference: str | None) -> float:
    """Rule reward (`kind: python`, `checker: flywheel.analysis.miniworld:exact_match`): 1.0 for the sorted list, else 0.0.
    Uses the reference when the prompt has one, else sorts the digits the prompt names."""
    if reference is None:
        digits = parse_prompt(prompt)
        if digits is None:
            raise ValueError(f"not a sorting prompt: {prompt[:60]!r}")
        reference = "".join(sorted(digits))
    return float(is_correct(response, reference))


def near_miss(digits: str, rng: random.Random) -> str:
    """A plausible wrong answer: two neighbours swapped, a digit dropped or doubled, or the input copied unsorted."""
    true = "".join(sorted(digits))
    options = {digits, true[:-1], true[1:], true + true[-1]}
    options |= {true[:i] + true[i + 1] + true[i] + true[i + 2:] for i in range(len(true) - 1)}
    options.discard(true)
    return rng.choice(sorted(options))


class SortWorld:
    def __init__(self, sizes: WorldSizes, seed: int):
        self.sizes, self.seed = sizes, seed

    def draw(self, rng: random.Random) -> str:
        n = rng.randint(self.sizes.min_len, self.sizes.max_len)
        return "".join(str(rng.randrange(10)) for _ in range(n))

    def problems(self) -> dict[str, list[str]]:
        """Disjoint splits, the test set drawn first."""
        s = self.sizes
        need = s.test + s.seeds + s.pool
        lists = sum(10 ** n for n in range(s.min_len, s.max_len + 1))
        if 2 * need > lists:
            raise ValueError(f"world: {need} distinct problems (test + seeds + pool) is over half of the {lists} lists "
                             f"of {s.min_len} to {s.max_len} digits; raise world.max_len or ask for fewer")
        rng = random.Random(f"sort-problems-{self.seed}")
        seen: set[str] = set()
        out: dict[str, list[str]] = {}
        for split, n in (("test", s.test), ("seeds", s.seeds), ("pool", s.pool)):
            out[split] = []
            while len(out[split]) < n:
                digits = self.draw(rng)
                if digits not in seen:
                    seen.add(digits)
                    out[split].append(digits)
        return out

    def corpus(self, held_out: set[str]) -> list[str]:
        """Documents of sorted lists (some after their question), none of them a held-out problem."""
        rng = random.Random(f"sort-corpus-{self.seed}")
        docs = []
        for _ in range(self.sizes.corpus_docs):
            lines: list[str] = []
            while len(lines) < self.sizes.lines_per_doc:
                digits = self.draw(rng)
                if digits in held_out:
                    continue
                if rng.random() < self.sizes.question_share:
                    lines += [prompt_of(digits), solution_of(digits)]
                else:
                    lines.append(line_of(digits))
            docs.append("\n".join(lines))
        return docs

    def write(self, out: Path) -> dict[str, Path]:
        """Write the world's four files under `out` (same seed and sizes: same bytes) and return their paths."""
        split = self.problems()
        rng = random.Random(f"sort-near-miss-{self.seed}")
        seeds = [seed_tree(f"sort-{i}", prompt_of(d), solution_of(d), near_miss(d, rng))
                 for i, d in enumerate(split["seeds"])]
        return write_world(out, self.corpus(set(split["test"])), seeds,
                           [{"prompt": prompt_of(d), "reference": solution_of(d)} for d in split["pool"]],
                           [{"prompt": prompt_of(d), "reference": solution_of(d), "digits": d} for d in split["test"]])


def seed_tree(tree_id: str, prompt: str, answer: str, near_miss: str) -> dict:
    """A seed problem as an Open Assistant message tree: the true answer ranked 0 (IFT), a near miss ranked 1."""
    return {"message_tree_id": tree_id, "prompt": {"text": prompt, "role": "prompter", "replies": [
        {"text": answer, "role": "assistant", "rank": 0}, {"text": near_miss, "role": "assistant", "rank": 1}]}}


def write_world(out: Path, corpus: list[str], seeds: list[dict], pool: list[dict], test: list[dict]) -> dict[str, Path]:
    """A mini-world's four files under `out` (corpus.txt: documents apart by a blank line; seeds, pool and test as
    JSON Lines); their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"corpus": out / "corpus.txt", "seeds": out / "seeds.jsonl", "pool": out / "pool.jsonl",
             "test": out / "test.jsonl"}
    files["corpus"].write_text("\n\n".join(corpus) + "\n")
    for name, rows in (("seeds", seeds), ("pool", pool), ("test", test)):
        _jsonl(files[name], rows)
    return files


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
