"""The reward-hacking monitors on real DuckDB registries whose rows are written by hand, so every figure is known.

`build_run` (tests/helpers/registry.py) writes a run's stage ledger, prompts, candidates, judgments, coherent rewards,
pairs and models the way the stages do, from small functions of (prompt, candidate) that set lengths, scores and
texts. A healthy run must fire nothing; a drifting one must fire each monitor on the iteration where its figure crosses
the threshold.
"""

from __future__ import annotations

import random

import pytest

from flywheel.analysis.monitors import MonitorsConfig, evaluate, fired
from flywheel.analysis.report import collect
from flywheel.registry import Registry
from tests.helpers.registry import HEALTHY, build_run, steady_scores, steady_tokens, varied_text


# --- the figures of a healthy and of a drifting iteration -------------------------------------------------------
def noisy_scores(p, j):  # two judge samples that agree only partly, with one parse failure in 20 samples
    rng = random.Random(f"noisy-{p}-{j}")
    first = rng.randint(0, 5)
    return [first, None if (p * 4 + j) % 20 == 0 else min(5, max(0, first + rng.choice([-1, 0, 1])))]


def test_a_healthy_run_fires_nothing(tmp_path):
    run = build_run(tmp_path, [HEALTHY, dict(HEALTHY, tokens=lambda p, j: steady_tokens(p, j) + 2)])
    with Registry(tmp_path) as reg:
        its = collect(reg, run)
    checks = evaluate(its)
    assert fired(checks) == []
    by = {(c.name, c.iteration): c for c in checks}
    assert by[("length_drift", 1)].fired is None and by[("score_inflation", 1)].fired is None  # nothing to compare
    assert by[("length_drift", 2)].fired is False
    assert by[("length_bias", 2)].fired is False and by[("parse_failures", 2)].fired is False
    assert its[1]["longer_chosen_share"] == 0.5


def test_length_drift_fires_on_growth_over_the_threshold(tmp_path):
    run = build_run(tmp_path, [HEALTHY, dict(HEALTHY, tokens=lambda p, j: int(steady_tokens(p, j) * 1.4)),
                               dict(HEALTHY, tokens=lambda p, j: int(steady_tokens(p, j) * 1.4 * 1.1))])
    with Registry(tmp_path) as reg:
        its = collect(reg, run)
    drift = {c.iteration: c for c in evaluate(its) if c.name == "length_drift"}
    assert its[0]["mean_tokens"] == 22.5 and its[1]["mean_tokens"] == 31.5
    assert drift[2].fired and "+40%" in drift[2].message
    assert drift[3].fired is False  # +10% is within the default 20%
    assert [c.iteration for c in fired(evaluate(its, MonitorsConfig(max_length_growth=0.05)))
            if c.name == "length_drift"] == [2, 3]


def test_length_bias_fires_when_the_chosen_is_mostly_the_longer(tmp_path):
    run = build_run(tmp_path, [dict(HEALTHY, tokens=lambda p, j: 10 + 5 * sum(steady_scores(p, j)))])
    with Registry(tmp_path) as reg:
        its = collect(reg, run)
    assert its[0]["longer_chosen_share"] == 1.0
    assert [c.name for c in fired(evaluate(its))] == ["length_bias"]
    # too few pairs to judge: n/a, not fired
    small = {c.name: c for c in evaluate(its, MonitorsConfig(min_pairs=its[0]["pairs"] + 1))}
    assert small["length_bias"].fired is None


def test_parse_failures_fire_over_the_rate(tmp_path):
    run = build_run(tmp_path, [dict(HEALTHY, scores=lambda p, j: [steady_scores(p, j)[0], None if j else 3])])
    with Registry(tmp_path) as reg:
        its = collect(reg, run)
    assert its[0]["parse_failure_rate"] == pytest.approx(3 / 8)
    assert [c.name for c in fired(evaluate(its))] == ["parse_failures"]
    assert not fired(evaluate(its, MonitorsConfig(max_parse_failure_rate=0.4)))


def test_diversity_collapse_fires_on_a_low_floor_or_a_steep_fall(tmp_path):
    def echo(p, j, t):  # every candidate says nearly the same thing
        return "the answer is good and the answer is right " + ("indeed" if j % 2 else "")

    def half_echo(p, j, t):
        return echo(p, j, t) if j < 2 else varied_text(p, j, t)

    run = build_run(tmp_path, [HEALTHY, dict(HEALTHY, text=half_echo), dict(HEALTHY, text=echo)])
    with Registry(tmp_path) as reg:
        its = collect(reg, run)
    d2 = [it["distinct_2"] for it in its]
    assert d2[0] > 0.9 and d2[2] < 0.05 and d2[2] < d2[1] < d2[0]
    coll = {c.iteration: c for c in evaluate(its) if c.name == "diversity_collapse"}
    assert coll[1].fired is False
    assert coll[2].fired and d2[1] > 0.2  # above the floor, but fell by more than 25%
    assert coll[3].fired
    # a fall the threshold allows, above the floor: quiet
    loose = {c.iteration: c for c in evaluate(its, MonitorsConfig(max_distinct_2_drop=0.9, min_distinct_2=0.01))
             if c.name == "diversity_collapse"}
    assert loose[2].fired is False


def test_score_inflation_with_and_without_a_rise_in_coherent_agreement(tmp_path):
    def up(scores):
        return lambda p, j: [min(5, s + 1.5) for s in scores(p, j)]

    def agrees(p, j):  # the coherent reward ranks candidates as the judge does
        return float(steady_scores(p, j)[0]) + 0.01 * p

    def unrelated(p, j):
        return random.Random(f"u-{p}-{j}").random()

    inflated = build_run(tmp_path / "a", [dict(HEALTHY, coherent=agrees), dict(HEALTHY, scores=up(steady_scores),
                                                                                coherent=unrelated)])
    backed = build_run(tmp_path / "b", [dict(HEALTHY, coherent=unrelated), dict(HEALTHY, scores=up(steady_scores),
                                                                               coherent=agrees)])
    with Registry(tmp_path / "a") as reg:
        its_a = collect(reg, inflated)
    with Registry(tmp_path / "b") as reg:
        its_b = collect(reg, backed)
    assert its_a[0]["agreement"] > 0.8 and abs(its_a[1]["agreement"]) < 0.5
    assert its_a[1]["mean_score"] - its_a[0]["mean_score"] > 1
    infl = [c for c in evaluate(its_a) if c.name == "score_inflation"]
    assert infl[1].fired and "coherent reward" in infl[1].message
    assert [c for c in evaluate(its_b) if c.name == "score_inflation"][1].fired is False
    # a rise within the limit does not fire, whatever the agreement does
    assert [c for c in evaluate(its_a, MonitorsConfig(max_score_rise=2.0)) if c.name == "score_inflation"][1].fired \
        is False


def test_score_inflation_falls_back_to_the_judges_self_agreement(tmp_path):
    def up(p, j):  # higher scores, and the second sample no longer follows the first
        return [min(5, noisy_scores(p, j)[0] + 2), min(5, random.Random(f"up-{p}-{j}").randint(0, 5) + 2)]

    run = build_run(tmp_path, [dict(HEALTHY, scores=noisy_scores), dict(HEALTHY, scores=up)])
    with Registry(tmp_path) as reg:
        its = collect(reg, run)
    assert its[0]["agreement"] is None and its[0]["judge_self_agreement"] is not None
    infl = [c for c in evaluate(its) if c.name == "score_inflation"][1]
    assert infl.fired and "judge self-agreement" in infl.message


def test_a_drifting_run_fires_every_monitor(tmp_path):
    def drift_tokens(p, j):
        return 30 + 10 * j

    def drift_scores(p, j):  # higher, rising with length, and half the prompts with a parse failure per candidate
        return [2 + j, None if p % 2 == 0 else 2 + j]

    def echo(p, j, t):
        return "great answer great answer great answer"

    def follows_judge(p, j):
        return float(noisy_scores(p, j)[0]) + 0.01 * j

    def unrelated(p, j):
        return random.Random(f"u-{p}-{j}").random()

    run = build_run(tmp_path, [dict(HEALTHY, scores=noisy_scores, coherent=follows_judge),
                               dict(tokens=drift_tokens, scores=drift_scores, text=echo, coherent=unrelated)],
                    monitors={"max_score_rise": 0.1})
    with Registry(tmp_path) as reg:
        its = collect(reg, run)
        from flywheel.analysis.report import monitors_config
        cfg = monitors_config(reg, run)
    assert cfg.max_score_rise == 0.1 and cfg.max_length_growth == MonitorsConfig().max_length_growth
    names = sorted(c.name for c in fired(evaluate(its, cfg)) if c.iteration == 2)
    assert names == ["diversity_collapse", "length_bias", "length_drift", "parse_failures", "score_inflation"]


def test_config_section_forbids_unknown_keys():
    with pytest.raises(ValueError, match="max_length_grwth"):
        MonitorsConfig.model_validate({"max_length_grwth": 0.1})
    with pytest.raises(ValueError):
        MonitorsConfig(max_parse_failure_rate=1.5)
