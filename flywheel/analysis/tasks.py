"""The worlds `flywheel experiment` runs in: for each, its files, its ground truth, and how a model's answers are graded.

    task = TASKS["ifworld"](IFWorldSizes(test=60))
    files = task.write(seed, out_dir)         # seeds, pool, test, ... (the world's own module writes them)
    test = task.test_set(files)               # [{"prompt", "reference", ...}]: the held-out set
    task.value(prompt, text, reference)       # ground truth of one answer, in [0, 1] (1 = right)
    task.grade(test, answers)                 # {"accuracy": ..., ...}: the held-out figure of a model
    task.judge_items(seed, files, test, n)    # [(prompt, a right answer, a wrong one, reference)]: the judge's test

- `sort` (flywheel/analysis/miniworld.py): a tiny model pretrained from scratch sorts digit lists; accuracy is exact
  match; a wrong answer for the judge is a near miss.
- `arith` (flywheel/analysis/arithworld.py): a tiny model pretrained from scratch on worked sums computes chains
  like `Compute 7+5-3+8.` one operation per line (`7+5=12` ...); accuracy is exact match of the final value, with the
  step accuracy (the share of operations done right before the first wrong line) beside it; a wrong answer for the
  judge is a near-miss chain (one step's result off by one or two, the later steps carried on from it). Its step
  rule (`arithworld.step_check`) scores each line, for step-level (process) rewards.
- `ifworld` (flywheel/analysis/ifworld.py): the real chat model (`model.base` of the experiment's config) follows
  IFEval's verifiable instructions; accuracy is IFEval's prompt-level strict accuracy (instruction-level and loose
  beside it); an answer's value is the share of its instructions followed; a wrong answer for the judge is the
  world's response built with one instruction left out (else the plain answer).

A pair is right by ground truth when its chosen answer's value is above its rejected one's (for sort and arith:
right over wrong). To add a world: a class with these methods and `sizes_model()` (the `world:` section), registered
in `TASKS`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from . import arithworld as aw
from . import miniworld as mw


class SortTask:
    name = "sort"
    metric = "exact match"
    @staticmethod
    def sizes_model():
        return mw.WorldSizes

    def __init__(self, sizes: mw.WorldSizes):
        self.world_sizes = sizes

    def write(self, seed: int, out: Path) -> dict[str, Path]:
        return mw.SortWorld(self.world_sizes, seed).write(out)

    def fixed_config(self, files: dict[str, Path]) -> dict:
        """What every variant's flywheel config takes from the world: the tiny model pretrained on its corpus."""
        return {"model": {"base": "tiny", "tiny": {"corpus": str(files["corpus"]) if "corpus" in files else None}}}

    def test_set(self, files: dict[str, Path]) -> list[dict]:
        return mw.read_jsonl(files["test"])

    def value(self, prompt: str, text: str, reference: str) -> float:
        return float(mw.is_correct(text, reference))

    def grade(self, test: list[dict], answers: list[str]) -> dict:
        correct = [mw.is_correct(a, r["reference"]) for a, r in zip(answers, test)]
        return {"accuracy": sum(correct) / len(test), "correct": correct}

    def judge_items(self, seed: int, files: dict[str, Path], test: list[dict], n: int) -> list[tuple]:
        rng = random.Random(f"judge-eval-{seed}")
        return [(r["prompt"], r["reference"], mw.near_miss(r["digits"], rng), r["reference"]) for r in test[:n]]


class ArithTask(SortTask):
    """As sort (the tiny model pretrained on the world's corpus, the test file as it is), with the arithmetic world's
    problems, checker and step accuracy."""
    name = "arith"

    @staticmethod
    def sizes_model():
        return aw.ArithSizes

    def write(self, seed: int, out: Path) -> dict[str, Path]:
        return aw.ArithWorld(self.world_sizes, seed).write(out)

    def value(self, prompt: str, text: str, reference: str) -> float:
        return aw.exact_match(prompt, text, reference)

    def grade(self, test: list[dict], answers: list[str]) -> dict:
        correct = [aw.is_correct(a, r["reference"]) for a, r in zip(answers, test)]
        steps = [aw.step_accuracy(r["prompt"], a) for a, r in zip(answers, test)]
        return {"accuracy": sum(correct) / len(test), "step_accuracy": sum(steps) / len(test), "correct": correct}

    def judge_items(self, seed: int, files: dict[str, Path], test: list[dict], n: int) -> list[tuple]:
        """The first `n` test problems, each with its true chain and a near miss (`arithworld.near_miss_chain`)."""
        rng = random.Random(f"judge-eval-{seed}")
        out = []
        for r in test[:n]:
            start, ops = aw.parse_prompt(r["prompt"])
            problem = (start, tuple(ops))
            out.append((r["prompt"], aw.solution_of(problem), aw.near_miss_chain(problem, rng), r["reference"]))
        return out


class IFTask:
    name = "ifworld"
    metric = "IFEval prompt-level strict accuracy"

    def __init__(self, sizes):
        self.world_sizes = sizes

    @staticmethod
    def sizes_model():  # imported late: if-verifiable is needed only when this world runs
        from .ifworld import IFWorldSizes
        return IFWorldSizes

    def world(self, seed: int):
        from .ifworld import IFWorld
        return IFWorld(self.world_sizes, seed)

    def write(self, seed: int, out: Path) -> dict[str, Path]:
        return self.world(seed).write(out)

    def fixed_config(self, files: dict[str, Path]) -> dict:
        return {}  # the model is the experiment config's own (a real chat model)

    def test_set(self, files: dict[str, Path]) -> list[dict]:
        rows = mw.read_jsonl(files["test"])
        return [{**r, "reference": json.dumps({"instruction_id_list": r["instruction_id_list"], "kwargs": r["kwargs"]},
                                              sort_keys=True)} for r in rows]

    def value(self, prompt: str, text: str, reference: str) -> float:
        from .ifworld import fraction_followed
        return fraction_followed(prompt, text, reference)

    def grade(self, test: list[dict], answers: list[str]) -> dict:
        from . import ifeval as ife

        checked = [ife.check_item(ife.parse_item(r, "test", i), a) for i, (r, a) in enumerate(zip(test, answers))]
        agg = ife.aggregate(checked)
        return {"accuracy": agg["prompt_strict"], "instruction_accuracy": agg["instruction_strict"],
                "prompt_loose": agg["prompt_loose"], "correct": [c.all_strict for c in checked]}

    def judge_items(self, seed: int, files: dict[str, Path], test: list[dict], n: int) -> list[tuple]:
        """The first `n` test prompts, each with the world's response that follows every instruction and the reply
        that follows the most of them but not all (built with one instruction left out, else none applied)."""
        from .ifworld import worse_replies

        splits, _ = self.world(seed).splits()
        rng = random.Random(f"judge-eval-{seed}")
        out = []
        for (wp, good), r in zip(splits["test"][:n], test):
            assert wp.prompt == r["prompt"], "the test file is not this world's (seed or sizes changed)"
            worse = worse_replies(wp, rng)
            if worse:
                out.append((wp.prompt, good, worse[0][0], r["reference"]))
        return out


TASKS = {"sort": SortTask, "arith": ArithTask, "ifworld": IFTask}
