"""Process rewards: a candidate split into steps, a score per step, and the scores aggregated. Pure functions, no
registry (the reward stage stores what these compute: flywheel/stages/reward.py).

    steps = split_steps(text, cfg.steps)                          # [Step(index, text, start, end)], spans in `text`
    values, error = rule_step_scores(load_step_rule(spec), spec, prompt, reference, [s.text for s in steps])
    found = step_verdicts(backend, template, [(prompt, step_texts, k), ...], cfg.steps, seed)   # the self-judge
    score = aggregate(values, "min")                              # min | product | mean; None if a step has none
    credit = online_step_rewards(cfg)                             # for GRPO/RLOO/PPO: (end_char, value) per step

Splitting (`steps.split`): 'line' makes each non-empty line a step; 'delimiter' cuts at `steps.delimiter`; 'regex'
cuts at each match of `steps.pattern` (re.split). Empty or whitespace-only pieces are dropped; a step's text is its
piece stripped, and its span (start, end) the stripped piece's place in the candidate's text, so `text[start:end]` is
the step. A candidate with more than `max_steps` steps keeps max_steps - 1 and the rest as one last step.

Two step signals, stored per step in `step_rewards` and aggregated into one `rewards` row per candidate:
- `step_rule`: a checker `module:function` called once per candidate as function(prompt, reference, steps), with the
  step texts, returning one number per step (a PRM from rules: step k judged given steps 0..k-1). A checker that
  raises, or returns the wrong count or a non-number, fails that candidate (every step NULL, the reason recorded).
- `step_judge`: M_t as a process judge (Process-based Self-Rewarding's step-wise LLM-as-a-judge): the template
  (`prompts/step_judge.txt`, fields {instruction}, {previous_steps}, {step}) shows the question, the steps before and
  the step to check; the reply must end with exactly one verdict line, 'Verdict: correct' (1.0) or 'Verdict: incorrect'
  (0.0). Anything else (no verdict, two that disagree) is a parse failure, counted and left out of the step's mean;
  a step with no valid sample gets no score, and then its candidate no aggregate.

`aggregate`: min (the default, as PRM practice: a chain is as good as its worst step), product, or mean.
"""

from __future__ import annotations

import importlib
import math
import re
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

from ..config import ConfigError, FlywheelConfig, StepsConfig, check_template, content_hash

STEP_JUDGE_FIELDS = ("instruction", "previous_steps", "step")
NO_PREVIOUS_STEPS = "(none: this is the first step)"
_VERDICT = re.compile(r"^\W*verdict\W*:\s*\**\s*(correct|incorrect)\s*\**\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)
_VERDICT_WORD = re.compile(r"verdict\s*:", re.IGNORECASE)


class StepRewardError(ValueError):
    """A step reward that cannot be computed for one candidate; the message names the rule and why."""


@dataclass(frozen=True)
class Step:
    index: int
    text: str
    start: int  # text == candidate_text[start:end]
    end: int


# --- splitting --------------------------------------------------------------------------------------------------------
def _separators(text: str, c: StepsConfig) -> list[tuple[int, int]]:
    if c.split == "line":
        return [(m.start(), m.end()) for m in re.finditer(r"\r?\n", text)]
    if c.split == "delimiter":
        return [(m.start(), m.end()) for m in re.finditer(re.escape(c.delimiter), text)]
    if c.split == "regex":
        return [(m.start(), m.end()) for m in re.finditer(c.pattern, text) if m.end() > m.start()]
    raise ValueError(f"steps.split={c.split!r} does not split")


def split_steps(text: str, c: StepsConfig) -> list[Step]:
    """The candidate's steps, in order (see the module docstring). An empty text has none."""
    pieces, start = [], 0
    for a, b in _separators(text, c) + [(len(text), len(text))]:
        pieces.append((start, a))
        start = b
    spans = []
    for a, b in pieces:
        piece = text[a:b]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            spans.append((a + lead, a + lead + len(stripped)))
    if len(spans) > c.max_steps:  # the tail joined as one last step
        spans = spans[: c.max_steps - 1] + [(spans[c.max_steps - 1][0], spans[-1][1])]
    return [Step(i, text[a:b], a, b) for i, (a, b) in enumerate(spans)]


def prefix_hashes(texts: Sequence[str]) -> list[str]:
    """For each step k, the hash of steps 0..k-1 (k = 0: of no step): two candidates continue the same prefix at step k
    exactly when their hashes at k are equal."""
    return [content_hash(list(texts[:k]), 16) for k in range(len(texts))]


# --- the step rule ----------------------------------------------------------------------------------------------------
def load_step_rule(spec: str) -> Callable:
    """The function `steps.rule` names ('module:function'); a ConfigError naming the setting when it cannot be had."""
    module_name, _, func_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"steps.rule: cannot import module {module_name!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"steps.rule: module {module_name!r} has no function {func_name!r}")
    return fn


def rule_step_scores(rule: Callable, spec: str, prompt: str, reference: str | None,
                     steps: list[str]) -> list[float]:
    """One score per step from the step rule; StepRewardError (naming the rule) when it raises or returns anything
    but len(steps) finite numbers."""
    try:
        values = rule(prompt, reference, list(steps))
    except Exception as e:
        raise StepRewardError(f"step rule {spec} raised {type(e).__name__}: {e}") from e
    try:
        values = list(values)
    except TypeError:
        raise StepRewardError(f"step rule {spec} returned {values!r}, not a list of scores") from None
    if len(values) != len(steps):
        raise StepRewardError(f"step rule {spec} returned {len(values)} scores for {len(steps)} steps")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise StepRewardError(f"step rule {spec} returned {v!r}, not a finite number")
    return [float(v) for v in values]


# --- the step-level self-judge ----------------------------------------------------------------------------------------
def check_step_judge(cfg: FlywheelConfig) -> str:
    """The step judge's template text, refused before any work when it is missing or its fields are not exactly
    {instruction}, {previous_steps} and {step}."""
    path = cfg.steps.judge_template
    if not path.is_file():
        raise ConfigError(f"steps.judge_template: template file not found: {path}")
    text = path.read_text(encoding="utf-8")
    check_template(text, "steps.judge_template", path, STEP_JUDGE_FIELDS)
    return text


def step_judge_prompt(template: str, instruction: str, steps: Sequence[str], k: int) -> str:
    previous = "\n".join(f"{i + 1}. {s}" for i, s in enumerate(steps[:k])) or NO_PREVIOUS_STEPS
    return template.format(instruction=instruction, previous_steps=previous, step=f"{k + 1}. {steps[k]}")


def parse_step_verdict(text: str) -> tuple[float | None, str | None]:
    """(1.0 for 'Verdict: correct', 0.0 for 'Verdict: incorrect', None) or (None, why): exactly one verdict is
    accepted; verdict lines that disagree, a 'Verdict:' with another word, or none at all are failures."""
    found = {m.group(1).lower() for m in _VERDICT.finditer(text)}
    if len(found) == 1:
        return (1.0 if found.pop() == "correct" else 0.0), None
    if len(found) > 1:
        return None, "conflicting_verdicts"
    return None, "unrecognised_verdict" if _VERDICT_WORD.search(text) else "no_verdict"


@dataclass
class StepVerdict:
    value: float | None       # the mean of the valid samples; None when none is valid
    raw: list[str]
    scores: list[float | None]
    errors: list[str | None]


def step_verdicts(backend, template: str, items: Sequence[tuple[str, Sequence[str], int]], c: StepsConfig,
                  seed: int) -> list[StepVerdict]:
    """The step judge's verdicts on (instruction, step texts, k) items, k the step to check: `c.judge_samples` samples
    each, in backend calls of `c.judge_batch_size` items (seeded `seed` + the first item's index)."""
    from ..backends import SamplingParams

    texts = [step_judge_prompt(template, x, steps, k) for x, steps, k in items]
    params = SamplingParams(n=c.judge_samples, temperature=c.judge_temperature, top_p=1.0,
                            max_new_tokens=c.judge_max_new_tokens)
    size = c.judge_batch_size
    found = [g for i in range(0, len(texts), size)
             for g in backend.generate(texts[i:i + size], params, seed=seed + i, chat=True)]
    out = []
    for gens in found:
        parsed = [parse_step_verdict(g.text) for g in gens]
        valid = [v for v, e in parsed if e is None]
        out.append(StepVerdict(sum(valid) / len(valid) if valid else None, [g.text for g in gens],
                               [v for v, _ in parsed], [e for _, e in parsed]))
    return out


# --- aggregation ------------------------------------------------------------------------------------------------------
def aggregate(values: Sequence[float | None], how: str) -> float | None:
    """A candidate's outcome score from its step scores: min, product or mean; None when it has no step, or a step
    has no score (a chain with an unscored step is not scored, never counted as 0 or 1)."""
    if not values or any(v is None for v in values):
        return None
    if how == "min":
        return min(values)
    if how == "product":
        return math.prod(values)
    if how == "mean":
        return sum(values) / len(values)
    raise ValueError(f"steps.aggregate: unknown aggregation {how!r}")


# --- step credit for the online trainers ------------------------------------------------------------------------------
StepCredit = Callable[[Sequence[str], Sequence[str], Sequence[str | None]], list[list[tuple[int, float]]]]


def online_step_rewards(cfg: FlywheelConfig) -> StepCredit | None:
    """For GRPO/RLOO/PPO with `steps.credit` > 0: a function (prompts, completions, references) -> per completion, one
    (end_char, value) per step that has a score, end_char the step's end in the completion's text (its last token is
    the one covering end_char - 1). A completion the rule cannot score gets no step credit (its reason is logged).
    None when step credit is off."""
    c = cfg.steps
    if not (c.enabled and c.credit and c.rule):
        return None
    rule = load_step_rule(c.rule)

    def credit(prompts, completions, references) -> list[list[tuple[int, float]]]:
        import logging

        out = []
        for prompt, text, reference in zip(prompts, completions, references):
            steps = split_steps(text, c)
            try:
                values = rule_step_scores(rule, c.rule, prompt, reference, [s.text for s in steps])
            except StepRewardError as e:
                logging.getLogger("flywheel").warning("step credit: %s", e)
                values = []
            out.append([(s.end, v) for s, v in zip(steps, values)])
        return out

    return credit


def steps_at_tokens(tokenizer, ids: list[int], steps, *, stripped: bool = False) -> list[tuple[int, float]]:
    """(end_char, value) steps of the text decoded from `ids` -> (token index, value): the index of the token holding
    the step's last character (end_char - 1), the first whose decoded prefix reaches end_char characters. `stripped`:
    the text was `.strip()`ped after decoding, so its offsets start after the leading whitespace."""
    if not ids:
        return []

    @cache
    def reach(j: int) -> int:  # characters decoded from ids[: j + 1]
        return len(tokenizer.decode(ids[: j + 1], skip_special_tokens=True))

    lead = 0
    if stripped:
        full = tokenizer.decode(ids, skip_special_tokens=True)
        lead = len(full) - len(full.lstrip())
    return [(min(bisect_left(range(len(ids)), end + lead, key=reach), len(ids) - 1), float(v)) for end, v in steps]
