import pytest

from flywheel.config import SelfInstructConfig
from flywheel.self_instruct import filter_reason, rouge_l, words


def test_rouge_l():
    a = words("list three ways to save water at home")
    assert rouge_l(a, a) == 1.0
    assert rouge_l(a, words("why is the sky blue")) == 0.0
    # LCS "to save water at home" = 5 words, of 6 and of 8: F1 = 2PR / (P + R)
    assert rouge_l(a, words("how to save water at home")) == pytest.approx(2 * (5 / 6) * (5 / 8) / (5 / 6 + 5 / 8))
    assert rouge_l([], a) == 0.0


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("Explain tides.", "too_short"),
        ("List three ways to save water at home.", "duplicate"),
        ("list three ways to save water AT home!", "duplicate"),  # same words after normalising
        ("List three easy ways to save water at home.", "near_duplicate"),
        ("Describe how a rainbow forms after rain.", None),
        (" ".join(["word"] * 200), "too_long"),
    ],
)
def test_filter_reasons(text, reason):
    kept = [words("List three ways to save water at home.")]
    assert filter_reason(text, kept, SelfInstructConfig()) == reason
