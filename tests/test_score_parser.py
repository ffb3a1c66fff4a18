import dataclasses
import random

import pytest

from flywheel.stages.score_parser import ParsedScore, parse_score

ERROR_CODES = {"empty", "no_score", "conflicting_scores", "out_of_range", "not_a_number"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 4", 4.0),
        ("score: 4", 4.0),
        ("SCORE: 4", 4.0),
        ("Score:4", 4.0),
        ("Score: 4/5", 4.0),
        ("Score: 4 / 5", 4.0),
        ("Score: 4 out of 5", 4.0),
        ("**Score:** 4", 4.0),
        ("**Score: 4**", 4.0),
        ("**Score**: 4", 4.0),
        ("Score: **4**", 4.0),
        ("Score: 3.5", 3.5),
        ("Score: 4.", 4.0),
        ("Score: 4 points", 4.0),
        ("Score: 4/5.", 4.0),
        ("Score: 2 (partial credit)", 2.0),
        ("Score: 4\n\nThe answer could still cite sources.", 4.0),
        ("   \n  Score: 4   \n\n", 4.0),
        ("Total score: 4", 4.0),
        ("Final score: 4", 4.0),
        ("**Final Score:** 3", 3.0),
        ("Overall score: 2", 2.0),
        ("- Score: 1", 1.0),
        ("### Score: 5", 5.0),
        ("It is relevant and complete. Score: 3", 3.0),
        (
            "The response addresses the question (+1), covers most of it (+1) "
            "and answers the core (+1).\nScore: 3",
            3.0,
        ),
    ],
)
def test_accepted_variants(text, expected):
    result = parse_score(text)
    assert result == ParsedScore(expected, None)
    assert result.ok


@pytest.mark.parametrize(
    "text, error",
    [
        ("", "empty"),
        ("   \n\t  ", "empty"),
        ("The answer is good and helpful.", "no_score"),
        ("I award 4 points.", "no_score"),
        ("Score - 4", "no_score"),
        ("Score 4", "no_score"),
        ("The score is 4", "no_score"),
        ("Relevance score: 1", "no_score"),
        ("The answer deserves a score: 3", "no_score"),
        ("Score: 4\nScore: 3", "conflicting_scores"),
        ("Total score: 2\nFinal score: 5", "conflicting_scores"),
        ("Score: 4\nScore: 6", "conflicting_scores"),
        ("Score: 6", "out_of_range"),
        ("Score: 4/10", "out_of_range"),
        ("Score: 4 out of 10", "out_of_range"),
        ("Score: high", "not_a_number"),
        ("Score: four", "not_a_number"),
        ("Score: 3-4", "not_a_number"),
        ("Score: 4.5.1", "not_a_number"),
        ("Score: N/A", "not_a_number"),
        ("Score:", "not_a_number"),
    ],
)
def test_rejections(text, error):
    result = parse_score(text)
    assert result == ParsedScore(None, error)
    assert not result.ok


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: high\nScore: 4", ParsedScore(4.0, None)),  # a valid verdict wins over a non-number
        ("Score: 4\nScore: pending", ParsedScore(4.0, None)),
        ("Score: 7\nScore: unclear", ParsedScore(None, "out_of_range")),
    ],
)
def test_not_a_number_only_without_another_verdict(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 0", ParsedScore(0.0, None)),
        ("Score: 5", ParsedScore(5.0, None)),
        ("Score: 0/5", ParsedScore(0.0, None)),
        ("Score: 5/5", ParsedScore(5.0, None)),
        ("Score: 5.5", ParsedScore(None, "out_of_range")),
        ("Score: -1", ParsedScore(None, "out_of_range")),
        ("Score: 6/5", ParsedScore(None, "out_of_range")),
        ("Score: -0.5", ParsedScore(None, "out_of_range")),
    ],
)
def test_default_bounds(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Score: 10", ParsedScore(10.0, None)),
        ("Score: 7/10", ParsedScore(7.0, None)),
        ("Score: 7.5", ParsedScore(7.5, None)),
        ("Score: 4/5", ParsedScore(None, "out_of_range")),  # denominator must equal max_score
        ("Score: 11", ParsedScore(None, "out_of_range")),
        ("Score: 0", ParsedScore(None, "out_of_range")),  # below min_score=1
    ],
)
def test_custom_bounds(text, expected):
    assert parse_score(text, min_score=1.0, max_score=10.0) == expected


@pytest.mark.parametrize(
    "text",
    [
        "Score: 4\nScore: 4",
        "**Score: 4**\n\nTo summarise, Score: 4.",
        "Score: 4/5\nFinal score: 4",
        "Score: 4\nScore: 4.0",
    ],
)
def test_identical_verdicts_accepted(text):
    assert parse_score(text) == ParsedScore(4.0, None)


@pytest.mark.parametrize(
    "text, expected",
    [
        # Quoted material next to a real verdict does not conflict with it.
        ('The answer says "Score: 5 points" but misses the point.\nScore: 2', ParsedScore(2.0, None)),
        ("The answer says \u201cScore: 5, clearly\u201d but is off.\nScore: 2", ParsedScore(2.0, None)),
        ("The answer ends with `Score: 5 / 5`.\nScore: 2", ParsedScore(2.0, None)),
        ("> Score: 5\n\nScore: 2", ParsedScore(2.0, None)),
        ("   > Quoted: Score: 5\nScore: 2", ParsedScore(2.0, None)),
        ("```\nScore: 5\n```\nScore: 2", ParsedScore(2.0, None)),
        ("```text\nprint('x')\nScore: 5\n```\nScore: 2", ParsedScore(2.0, None)),
        ("Score: 2\n```\nScore: 5", ParsedScore(2.0, None)),  # unterminated fence
        # The only score is quoted: there is no verdict.
        ('The answer says "Score: 5 points" and nothing more.', ParsedScore(None, "no_score")),
        ("> Score: 5", ParsedScore(None, "no_score")),
        ("```\nScore: 5\n```", ParsedScore(None, "no_score")),
        ("Inline `Score: 5 / 5` only.", ParsedScore(None, "no_score")),
    ],
)
def test_quoted_scores_ignored(text, expected):
    assert parse_score(text) == expected


def test_parsed_score_is_frozen_and_ok_tracks_error():
    good, bad = ParsedScore(3.0, None), ParsedScore(None, "no_score")
    assert good.ok and not bad.ok
    with pytest.raises(dataclasses.FrozenInstanceError):
        good.score = 1.0  # type: ignore[misc]


def test_never_raises_on_random_text():
    rng = random.Random(0)
    alphabet = [
        "Score:", "score:", "Final score:", "Score", " ", "  ", "\n", "0", "1", "4", "5", "9",
        "/", ".", "-", "*", "**", ">", "`", "```", '"', "out of", "four", "a",
    ]
    outcomes = set()
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        result = parse_score(text)
        assert isinstance(result, ParsedScore)
        # Exactly one of score / error is set, errors are known codes, scores are in range.
        assert (result.score is None) != (result.error is None), (text, result)
        if result.ok:
            assert 0.0 <= result.score <= 5.0, (text, result)
        else:
            assert result.error in ERROR_CODES, (text, result)
        outcomes.add(result.error)
    # The generator really exercises the parser: successes and several error codes occur.
    assert None in outcomes and len(outcomes) >= 4, outcomes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Points: 3", ParsedScore(3.0, None)),
        ("Total points: 4", ParsedScore(4.0, None)),
        ("**Points:** 2", ParsedScore(2.0, None)),
        ("Score = 3", ParsedScore(3.0, None)),
        ("score=3", ParsedScore(3.0, None)),
        ("Rating: [[4]]", ParsedScore(4.0, None)),  # FastChat's verdict
        ("The reply is fine.\nRating: [[4]].", ParsedScore(4.0, None)),
        ("Score: [[4]]", ParsedScore(4.0, None)),
        ("Rating: [3]", ParsedScore(3.0, None)),
        # "Points:"/"Rating:" count only without a "Score" verdict: per-criterion points do not conflict with it
        ("Relevance - Points: 1\nPoints: 1\nScore: 3", ParsedScore(3.0, None)),
        ("Rating: [[2]]\nScore: 4", ParsedScore(4.0, None)),
        # the same strictness as "Score"
        ("I award 4 points.", ParsedScore(None, "no_score")),
        ("Points 3", ParsedScore(None, "no_score")),
        ("Relevance rating: 2", ParsedScore(None, "no_score")),
        ("checkpoints: 3", ParsedScore(None, "no_score")),
        ("Points: 3\nRating: [[4]]", ParsedScore(None, "conflicting_scores")),
        ("Rating: [[8]]", ParsedScore(None, "out_of_range")),  # MT-Bench's 1-10 scale is not ours
        ("Points: many", ParsedScore(None, "not_a_number")),
        ("Score == 3", ParsedScore(None, "not_a_number")),
    ],
)
def test_points_rating_and_equals_verdicts(text, expected):
    assert parse_score(text) == expected
