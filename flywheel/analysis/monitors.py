"""Reward-hacking monitors: the known failure modes of a self-rewarding loop as named checks per iteration.

    checks = evaluate(report.collect(reg, run_id), MonitorsConfig())
    fired = [c for c in checks if c.fired]

Each check reads the figures `flywheel.analysis.report.collect` counts from the registry and compares them with a threshold of
`MonitorsConfig` (the run config's `monitors` section):

- `length_drift` (length drift): the mean candidate length in tokens grew by more than `max_length_growth` (a
  fraction) since the previous iteration. The paper's M1 -> M2 -> M3 grew 42% then 64%.
- `score_inflation` (bias amplification): the mean judge score rose by more than `max_score_rise` points while the
  judge's agreement with an independent signal did not rise by more than `min_agreement_rise`. The signal is the
  coherent reward (Spearman over candidates) when both iterations have it; otherwise the judge's agreement with
  itself (Spearman between two of its samples of the same candidates), and the message says which. With neither, a
  score rise alone fires.
- `length_bias` (bias amplification): of the iteration's pairs (at least `min_pairs`), more than
  `max_longer_chosen_share` have a chosen response longer than its rejected one: the judge may be paying for length.
- `diversity_collapse` (echo chamber): distinct-2 (unique word bigrams over all bigrams, across the candidates) fell
  below `min_distinct_2`, or fell by more than `max_distinct_2_drop` (a fraction) since the previous iteration.
- `parse_failures`: more than `max_parse_failure_rate` of the judge samples held no valid verdict.

A check that lacks its figures (the first iteration has no previous one; a stage has not run) is `n/a`, never fired.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class MonitorsConfig(BaseModel):
    """Thresholds of the reward-hacking monitors (`monitors:` in the run config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_length_growth: float = Field(0.2, ge=0, description="length_drift: largest relative growth of the mean "
                                     "candidate length (tokens) from one iteration to the next.")
    max_score_rise: float = Field(0.2, ge=0, description="score_inflation: largest rise of the mean judge score "
                                  "(points of 5) that needs no rise in agreement.")
    min_agreement_rise: float = Field(0.0, description="score_inflation: a score rise beyond max_score_rise is fine "
                                      "when the agreement (Spearman) rose by more than this.")
    max_longer_chosen_share: float = Field(0.7, ge=0, le=1, description="length_bias: largest share of pairs whose "
                                           "chosen response is longer (tokens) than the rejected one.")
    min_pairs: int = Field(10, ge=1, description="length_bias: fewer pairs than this are too few to judge.")
    min_distinct_2: float = Field(0.2, ge=0, le=1, description="diversity_collapse: lowest distinct-2 ratio.")
    max_distinct_2_drop: float = Field(0.25, ge=0, le=1, description="diversity_collapse: largest relative fall of "
                                       "distinct-2 from one iteration to the next.")
    max_parse_failure_rate: float = Field(0.2, ge=0, le=1, description="parse_failures: largest share of judge "
                                          "samples with no valid verdict.")


FAILURE_MODES = {
    "length_drift": "length drift",
    "score_inflation": "bias amplification",
    "length_bias": "bias amplification",
    "diversity_collapse": "echo chamber",
    "parse_failures": "broken judge",
}


@dataclass(frozen=True)
class Check:
    """One monitor on one iteration. `fired` is None when the figures it needs are missing (n/a)."""

    name: str
    iteration: int
    fired: bool | None
    message: str

    @property
    def failure_mode(self) -> str:
        return FAILURE_MODES[self.name]

    @property
    def status(self) -> str:
        return "n/a" if self.fired is None else "WARN" if self.fired else "ok"


def _na(name: str, it: dict, why: str) -> Check:
    return Check(name, it["iteration"], None, why)


def _length_drift(it: dict, prev: dict | None, c: MonitorsConfig) -> Check:
    name = "length_drift"
    if prev is None or not prev.get("mean_tokens") or it.get("mean_tokens") is None:
        return _na(name, it, "no previous iteration to compare with")
    growth = it["mean_tokens"] / prev["mean_tokens"] - 1
    msg = (f"mean length {prev['mean_tokens']:.1f} -> {it['mean_tokens']:.1f} tokens ({growth:+.0%}; "
           f"limit +{c.max_length_growth:.0%} per iteration)")
    return Check(name, it["iteration"], growth > c.max_length_growth, msg)


def _agreements(it: dict, prev: dict) -> tuple[float | None, float | None, str | None]:
    """(now, before, source) of the first agreement measured in both iterations: coherent reward, then self."""
    for key, source in (("agreement", "coherent reward"), ("judge_self_agreement", "judge self-agreement")):
        if it.get(key) is not None and prev.get(key) is not None:
            return it[key], prev[key], source
    return None, None, None


def _score_inflation(it: dict, prev: dict | None, c: MonitorsConfig) -> Check:
    name = "score_inflation"
    if prev is None or it.get("mean_score") is None or prev.get("mean_score") is None:
        return _na(name, it, "no previous iteration to compare with")
    rise = it["mean_score"] - prev["mean_score"]
    msg = (f"mean judge score {prev['mean_score']:.2f} -> {it['mean_score']:.2f} ({rise:+.2f}; "
           f"limit +{c.max_score_rise})")
    if rise <= c.max_score_rise:
        return Check(name, it["iteration"], False, msg)
    now, before, source = _agreements(it, prev)
    if source is None:
        return Check(name, it["iteration"], True, msg + " with no agreement signal measured in both iterations to "
                     "back it (coherent reward, or two valid judge samples per candidate)")
    backed = now - before > c.min_agreement_rise
    return Check(name, it["iteration"], not backed,
                 f"{msg}; {source} Spearman {before:.2f} -> {now:.2f} ({now - before:+.2f}; needs > "
                 f"{c.min_agreement_rise:+.2f})")


def _length_bias(it: dict, prev: dict | None, c: MonitorsConfig) -> Check:
    name = "length_bias"
    share, pairs = it.get("longer_chosen_share"), it.get("pairs") or 0
    if share is None or pairs < c.min_pairs:
        return _na(name, it, f"{pairs} pairs, fewer than min_pairs={c.min_pairs}")
    msg = f"{share:.0%} of {pairs} pairs chose the longer response (limit {c.max_longer_chosen_share:.0%})"
    return Check(name, it["iteration"], share > c.max_longer_chosen_share, msg)


def _diversity_collapse(it: dict, prev: dict | None, c: MonitorsConfig) -> Check:
    name = "diversity_collapse"
    d2 = it.get("distinct_2")
    if d2 is None:
        return _na(name, it, "no candidate text with two or more words")
    msg = f"distinct-2 {d2:.3f} (floor {c.min_distinct_2})"
    fired = d2 < c.min_distinct_2
    if prev is not None and prev.get("distinct_2"):
        fall = 1 - d2 / prev["distinct_2"]
        msg = (f"distinct-2 {prev['distinct_2']:.3f} -> {d2:.3f} ({-fall:+.0%}; floor {c.min_distinct_2}, "
               f"largest fall {c.max_distinct_2_drop:.0%})")
        fired = fired or fall > c.max_distinct_2_drop
    return Check(name, it["iteration"], fired, msg)


def _parse_failures(it: dict, prev: dict | None, c: MonitorsConfig) -> Check:
    name = "parse_failures"
    rate = it.get("parse_failure_rate")
    if rate is None:
        return _na(name, it, "no judge samples")
    msg = (f"{it['parse_failures']} of {it['judge_samples']} judge samples had no valid verdict ({rate:.0%}; "
           f"limit {c.max_parse_failure_rate:.0%})")
    return Check(name, it["iteration"], rate > c.max_parse_failure_rate, msg)


CHECKS = {"length_drift": _length_drift, "score_inflation": _score_inflation, "length_bias": _length_bias,
          "diversity_collapse": _diversity_collapse, "parse_failures": _parse_failures}


def evaluate(iterations: list[dict], cfg: MonitorsConfig | None = None) -> list[Check]:
    """Every check on every iteration (>= 1), in iteration order; each iteration is compared with the one before."""
    cfg = cfg or MonitorsConfig()
    loop = sorted((it for it in iterations if it["iteration"] >= 1), key=lambda it: it["iteration"])
    checks = []
    for i, it in enumerate(loop):
        prev = loop[i - 1] if i else None
        checks += [check(it, prev, cfg) for check in CHECKS.values()]
    return checks


def fired(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.fired]
