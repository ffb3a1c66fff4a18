"""A verifiable mini-world with steps: multi-step arithmetic written one operation per line, so that a reward can
score each step (a process reward) as well as the final answer (an outcome reward).

    world = ArithWorld(ArithSizes(), seed=0)
    files = world.write(out_dir)     # corpus.txt, seeds.jsonl, pool.jsonl, test.jsonl

A problem is a start number and 2 to `max_ops` operations `+b` / `-b`, asked as `Compute 7+5-3+8.`; its solution
is one line per operation, each from the running value:

    7+5=12
    12-3=9
    9+8=17

and its reference the final value, `17`. Start and operands are 0..`max_operand` and 1..`max_operand`; every running
value stays within 0..`max_value`, so the numbers the model writes are short (one or two digits by default).

Every problem is drawn once and lands in exactly one file:
- `test.jsonl`: the held-out set ({prompt, reference, solution}); no other file holds these problems, and
  pretraining never sees them.
- `seeds.jsonl`: the seed data, in the Open Assistant format the seed loader reads: the true chain as the rank-0
  reply (IFT: the SFT data of M1) and a near miss as rank 1 (one step's result off by one or two, the later steps
  carried on from the wrong value, so the chain is consistent after its error).
- `pool.jsonl`: the new prompts of the iterations, with references (`self_instruct.prompts_file`).
- `corpus.txt`: unlabeled text for pretraining (`model.tiny.corpus`): documents of chains, a `question_share` of
  them after their question line, as text on the web mixes bare worked sums and Q&A.

The checkers (`python` rules; the step rule is what `steps.rule` names):
- `exact_match(prompt, response, reference)`: the outcome: 1.0 iff the final answer (the number after the last '='
  of the response's last non-empty line, or that whole line if it is a bare number) is the reference.
- `step_check(prompt, reference, steps)`: the process: one score per step (a line of the response), 1.0 iff the
  step is the right next line and every step before it was right (first-error labelling, as PRM800K's); a step past
  the chain's operations scores 0, and so does a last step that is not the chain's last operation, so that the
  minimum of the step scores equals exact match for a response written as lines `a+b=c`.
- `step_accuracy(prompt, response)`: the share of the operations done right, in order, before the first wrong line:
  a held-out figure beside exact match.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from pydantic import Field, model_validator

from ..config import _Section
from .miniworld import seed_tree, write_world

_PROMPT = re.compile(r"^\s*Compute (\d+)((?:[+-]\d+)+)\.(?:\s|$)")  # an instruction may follow
_OP = re.compile(r"([+-])(\d+)")
_STEP = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*$")
_NUMBER = re.compile(r"-?\d+")

Op = tuple[str, int]                  # ("+", 5)
Problem = tuple[int, tuple[Op, ...]]  # (7, (("+", 5), ("-", 3), ("+", 8)))


class ArithSizes(_Section):
    """The world's shape and how many problems of each kind (`world:` in an experiment config)."""

    min_ops: int = Field(2, ge=1, description="Fewest operations in a problem (lines in its solution).")
    max_ops: int = Field(4, ge=1, le=12, description="Most operations in a problem.")
    max_operand: int = Field(9, ge=1, description="Largest start number and operand (operands are 1..max_operand, "
                             "the start 0..max_operand).")
    max_value: int = Field(99, ge=1, description="Every running value stays within 0..max_value.")
    corpus_docs: int = Field(4000, ge=1, description="Pretraining documents of `lines_per_doc` chains.")
    lines_per_doc: int = Field(6, ge=1, description="Chains (worked problems) per pretraining document.")
    question_share: float = Field(0.5, ge=0, le=1, description="Share of the corpus's chains written after their "
                                  "question line rather than bare.")
    seeds: int = Field(200, ge=2, description="Seed problems (IFT chain + a near miss for EFT).")
    pool: int = Field(1000, ge=1, description="New prompts for the iterations (each used once per run).")
    test: int = Field(300, ge=1, description="Held-out problems, never trained on.")

    @model_validator(mode="after")
    def _bounds(self) -> "ArithSizes":
        if self.min_ops > self.max_ops:
            raise ValueError(f"min_ops ({self.min_ops}) is above max_ops ({self.max_ops})")
        if self.max_operand > self.max_value:
            raise ValueError(f"max_operand ({self.max_operand}) is above max_value ({self.max_value}): a start "
                             "number would be out of bounds")
        return self


# --- a problem and its chain -------------------------------------------------------------------------------------------
def prompt_of(problem: Problem) -> str:
    start, ops = problem
    return f"Compute {start}{''.join(f'{op}{b}' for op, b in ops)}."


def parse_prompt(text: str) -> tuple[int, list[Op]] | None:
    """(start, [(op, b), ...]) of an arithmetic prompt, or None when it is not one."""
    m = _PROMPT.match(text)
    if not m:
        return None
    return int(m.group(1)), [(op, int(b)) for op, b in _OP.findall(m.group(2))]


def values_of(problem: Problem) -> list[int]:
    """The running values: the start, then the value after each operation."""
    start, ops = problem
    out = [start]
    for op, b in ops:
        out.append(out[-1] + b if op == "+" else out[-1] - b)
    return out


def step_lines(problem: Problem) -> list[str]:
    """The solution's lines: `a+b=c` per operation, a the running value before it."""
    vals = values_of(problem)
    return [f"{vals[k]}{op}{b}={vals[k + 1]}" for k, (op, b) in enumerate(problem[1])]


def solution_of(problem: Problem) -> str:
    return "\n".join(step_lines(problem))


def reference_of(problem: Problem) -> str:
    return str(values_of(problem)[-1])


def _problem(prompt: str) -> Problem:
    parsed = parse_prompt(prompt)
    if parsed is None:
        raise ValueError(f"not an arithmetic prompt: {prompt[:60]!r}")
    return parsed[0], tuple(parsed[1])


# --- checkers ----------------------------------------------------------------------------------------------------------
def final_answer(response: str) -> str | None:
    """The response's final answer: the number after the last '=' of its last non-empty line, or that whole line if
    it is a bare number; else None. '9+8=17' and '17' give '17'; '9+8=' and 'seventeen' give None."""
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    if not lines:
        return None
    tail = lines[-1].rsplit("=", 1)[-1].strip()
    return tail if _NUMBER.fullmatch(tail) else None


def is_correct(response: str, reference: str) -> bool:
    return final_answer(response) == reference.strip()


def exact_match(prompt: str, response: str, reference: str | None) -> float:
    """Rule reward (`kind: python`, `checker: flywheel.analysis.arithworld:exact_match`): 1.0 for the right final
    value, else 0.0. Uses the reference when there is one, else computes it from the prompt."""
    if reference is None:
        reference = reference_of(_problem(prompt))
    return float(is_correct(response, reference))


def _step_right(step: str, problem: Problem, vals: list[int], k: int) -> bool:
    """Is `step` the k-th line of the chain (`a+b=c`, spaces around the parts allowed)?"""
    m = _STEP.match(step)
    if not m or k >= len(problem[1]):
        return False
    op, b = problem[1][k]
    return m.groups() == (str(vals[k]), op, str(b), str(vals[k + 1]))


def step_check(prompt: str, reference: str | None, steps: list[str]) -> list[float]:
    """Step-level rule (the process reward): one score per step of a response (its lines, split and stripped by the
    caller), in order. Step k scores 1.0 iff it is the chain's k-th line `a+b=c` (a the right running value, the
    prompt's k-th operation, c right; spaces around the parts allowed), every step before it scored 1.0 (after the
    first wrong step all score 0: first-error labelling), and, when it is the response's last step, it is the
    chain's last operation (a chain that stops early ends on a 0). Steps past the chain's operations score 0. So
    the minimum of the scores is 1 exactly when the response is the whole right chain and nothing more.
    `reference` (the final value), when given, must be the prompt's; ValueError for a prompt that is not arithmetic."""
    problem = _problem(prompt)
    vals = values_of(problem)
    if reference is not None and reference.strip() != str(vals[-1]):
        raise ValueError(f"reference {reference!r} is not the value of {prompt[:60]!r} ({vals[-1]})")
    n, last = len(problem[1]), len(steps) - 1
    scores: list[float] = []
    ok = True
    for k, step in enumerate(steps):
        ok = ok and _step_right(step, problem, vals, k) and (k < last or k == n - 1)
        scores.append(float(ok))
    return scores


def leading_right(problem: Problem, lines: list[str]) -> int:
    """How many of the chain's lines `lines` gets right, in order, before its first wrong one."""
    vals = values_of(problem)
    k = 0
    while k < min(len(lines), len(problem[1])) and _step_right(lines[k], problem, vals, k):
        k += 1
    return k


def step_accuracy(prompt: str, response: str) -> float:
    """The share of the problem's operations the response does right, in order (its leading right lines, blank lines
    skipped, over the number of operations): a held-out figure, partial credit where exact match gives none."""
    problem = _problem(prompt)
    lines = [line.strip() for line in response.splitlines() if line.strip()]
    return leading_right(problem, lines) / len(problem[1])


def near_miss_chain(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong chain: one step's result off by one or two, and the later steps carried on from the wrong
    value (each of them right arithmetic on its own), so the final value is off by the same amount. No value goes
    below 0."""
    vals = values_of(problem)
    _, ops = problem
    k = rng.randrange(len(ops))
    deltas = [d for d in (-2, -1, 1, 2) if min(vals[k + 1:]) + d >= 0]  # +1 and +2 always qualify
    d = rng.choice(deltas)
    wrong = vals[:k + 1] + [v + d for v in vals[k + 1:]]
    return "\n".join(f"{wrong[j]}{op}{b}={wrong[j + 1]}" for j, (op, b) in enumerate(ops))


# --- the world ---------------------------------------------------------------------------------------------------------
class ArithWorld:
    def __init__(self, sizes: ArithSizes, seed: int):
        self.sizes, self.seed = sizes, seed

    def draw(self, rng: random.Random) -> Problem:
        """A start, then operations drawn uniformly from those that keep the running value within 0..max_value."""
        s = self.sizes
        value = start = rng.randint(0, s.max_operand)
        ops = []
        for _ in range(rng.randint(s.min_ops, s.max_ops)):
            options = [(op, b) for op in "+-" for b in range(1, s.max_operand + 1)
                       if 0 <= (value + b if op == "+" else value - b) <= s.max_value]
            op, b = rng.choice(options)
            value = value + b if op == "+" else value - b
            ops.append((op, b))
        return start, tuple(ops)

    def count(self) -> int:
        """How many distinct problems the sizes allow."""
        s = self.sizes
        ways = [1 if v <= s.max_operand else 0 for v in range(s.max_value + 1)]  # chains of 0 operations, by value
        total = 0
        for n in range(1, s.max_ops + 1):
            nxt = [0] * (s.max_value + 1)
            for v, w in enumerate(ways):
                if w:
                    for b in range(1, s.max_operand + 1):
                        if v + b <= s.max_value:
                            nxt[v + b] += w
                        if v - b >= 0:
                            nxt[v - b] += w
            ways = nxt
            if n >= s.min_ops:
                total += sum(ways)
        return total

    def problems(self) -> dict[str, list[Problem]]:
        """Disjoint splits, the test set drawn first."""
        s = self.sizes
        need = s.test + s.seeds + s.pool
        # the shortest chains are the fewest; the lengths are equally likely, so they must not run out
        short = ArithWorld(s.model_copy(update={"max_ops": s.min_ops}), self.seed).count()
        lengths = s.max_ops - s.min_ops + 1
        if 2 * need > self.count() or 2 * need > short * lengths:
            raise ValueError(f"world: {need} distinct problems (test + seeds + pool) is too many for chains of "
                             f"{s.min_ops} to {s.max_ops} operations on numbers up to {s.max_operand} "
                             f"({self.count()} problems, {short} of the shortest); raise world.max_ops, "
                             "world.max_operand or world.min_ops, or ask for fewer")
        rng = random.Random(f"arith-problems-{self.seed}")
        seen: set[Problem] = set()
        out: dict[str, list[Problem]] = {}
        for split, n in (("test", s.test), ("seeds", s.seeds), ("pool", s.pool)):
            out[split] = []
            while len(out[split]) < n:
                problem = self.draw(rng)
                if problem not in seen:
                    seen.add(problem)
                    out[split].append(problem)
        return out

    def corpus_problems(self, held_out: set[Problem]) -> list[list[tuple[Problem, bool]]]:
        """The corpus's documents as (problem, written after its question?) lists, none of them a held-out problem.
        (A held-out chain can still be seen inside a longer one: its steps are the skill, its question is not.)"""
        rng = random.Random(f"arith-corpus-{self.seed}")
        docs = []
        for _ in range(self.sizes.corpus_docs):
            doc: list[tuple[Problem, bool]] = []
            while len(doc) < self.sizes.lines_per_doc:
                problem = self.draw(rng)
                if problem not in held_out:
                    doc.append((problem, rng.random() < self.sizes.question_share))
            docs.append(doc)
        return docs

    def corpus(self, held_out: set[Problem]) -> list[str]:
        """Documents of worked chains (some after their question), none of them a held-out problem."""
        return ["\n".join(line for problem, asked in doc
                          for line in ([prompt_of(problem)] if asked else []) + step_lines(problem))
                for doc in self.corpus_problems(held_out)]

    def write(self, out: Path) -> dict[str, Path]:
        """Write the world's four files under `out` (same seed and sizes: same bytes) and return their paths."""
        split = self.problems()
        rng = random.Random(f"arith-near-miss-{self.seed}")
        seeds = [seed_tree(f"arith-{i}", prompt_of(p), solution_of(p), near_miss_chain(p, rng))
                 for i, p in enumerate(split["seeds"])]
        return write_world(out, self.corpus(set(split["test"])), seeds,
                           [{"prompt": prompt_of(p), "reference": reference_of(p)} for p in split["pool"]],
                           [{"prompt": prompt_of(p), "reference": reference_of(p), "solution": solution_of(p)}
                            for p in split["test"]])
