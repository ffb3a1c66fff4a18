"""Extract the judge's verdict from an LLM-as-a-judge generation.

The judge scores an answer with an additive 5-point rubric and should end with a
line ``Score: <points>``. ``parse_score`` finds that verdict. It never guesses and
never raises: an unusable judgment comes back with an ``error`` reason code that
the caller stores and counts.

Rules
-----
* A verdict is the keyword ``score`` (any case, optionally preceded by ``total``,
  ``final`` or ``overall``) followed by a **colon** or ``=``, then the value.
  ``Score - 4``, ``Score 4``, ``score is 4`` and ``score of 4`` are not verdicts.
* ``Points:`` and ``Rating:`` (FastChat's ``Rating: [[4]]``) are verdicts too, by the
  same rules, but only in a text with no ``score`` verdict: a judge that writes
  ``Points: 1`` per criterion and then ``Score: 3`` gave 3.
* Markdown emphasis around the keyword or the value is allowed
  (``**Score:** 4``, ``**Score: 4**``, ``Score: **4**``), and so are square
  brackets around the value (``[[4]]``, ``[4]``) and text after the value or after
  the verdict line (``Score: 4.``, ``Score: 4 points``).
* The keyword must not continue a phrase: if a letter or digit comes before it on
  the same line (``Relevance score: 1``, ``a score: 3``, ``my final score: 4``),
  it is prose, not the verdict. Punctuation or markup before it is fine.
* The value is an integer or decimal (``4``, ``3.5``), optionally written as a
  fraction ``4/5`` or ``4 out of 5`` whose denominator must equal ``max_score``.
  Words (``four``), ranges (``3-4``) and anything else are not numbers.
* Quoted material is not the judge's own verdict and is ignored: triple-backtick
  code fences, lines starting with ``>``, and ``"..."``, curly-quoted or
  single-backtick spans within one line.

Error codes, checked in this order:
``empty`` (blank text), ``no_score`` (no verdict), ``conflicting_scores`` (numeric
verdicts with different values; repeats of one value are fine), ``out_of_range``
(value outside ``[min_score, max_score]`` or wrong denominator), ``not_a_number``
(only verdicts whose value is not a number).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ParsedScore", "parse_score"]

# Quoted material, removed before searching. Fences first (they may hold quotes
# or ">" lines); an unterminated fence runs to the end of the text.
_FENCE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_QUOTE_LINE = re.compile(r"^[ \t]*>.*$", re.MULTILINE)
_INLINE_QUOTE = re.compile(r'"[^"\n]*"|\u201c[^\u201d\n]*\u201d|`[^`\n]*`')

# "[total|final|overall] score|points|rating", optional emphasis, a colon or "=",
# optional emphasis or "[", then the rest of the line as the candidate value.
_VERDICT = re.compile(
    r"(?<![A-Za-z0-9])(?:(?:total|final|overall)[ \t]+)?(?P<key>score|points|rating)[*_ \t]*[:=][*_ \t\[]*"
    r"(?P<value>[^\n]*)",
    re.IGNORECASE,
)
# A letter or digit (plus spaces/markup) right before the keyword: it is prose.
_WORD_BEFORE = re.compile(r"[A-Za-z0-9][*_ \t]*$")

# The value: a number, optionally "/ den" or "out of den", which must end at
# whitespace or end of text, after optional closing punctuation/markup.
_NUMBER = re.compile(
    r"(?P<num>[-+]?\d+(?:\.\d+)?)"
    r"(?:[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<den>\d+(?:\.\d+)?))?"
    r"(?=[*_.,;:!)\]]*(?:\s|$))",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedScore:
    score: float | None  # None when the text has no valid verdict
    error: str | None  # None on success, else one of the reason codes above

    @property
    def ok(self) -> bool:
        return self.error is None


def parse_score(text: str, *, min_score: float = 0.0, max_score: float = 5.0) -> ParsedScore:
    """Return the judge's verdict in ``text``, or the reason there is none."""
    if not text or not text.strip():
        return ParsedScore(None, "empty")

    text = _FENCE.sub(" ", text)
    text = _QUOTE_LINE.sub("", text)
    text = _INLINE_QUOTE.sub(" ", text)

    verdicts = []
    for m in _VERDICT.finditer(text):
        line_start = text.rfind("\n", 0, m.start()) + 1
        if not _WORD_BEFORE.search(text, line_start, m.start()):  # "Relevance score: 1" and the like are prose
            verdicts.append(m)
    # "Points:" / "Rating:" count only where there is no "Score:" verdict
    verdicts = [m for m in verdicts if m.group("key").lower() == "score"] or verdicts

    values: list[float] = []  # every numeric verdict, in or out of range
    bad_range = False  # some numeric verdict is out of range / has a wrong denominator
    found = bool(verdicts)  # some verdict keyword was seen at all
    for m in verdicts:
        num = _NUMBER.match(m.group("value"))
        if num is None:
            continue  # "Score: high": counts only if nothing else is found
        value = float(num.group("num"))
        den = num.group("den")
        if den is not None and float(den) != max_score:
            bad_range = True
        if not min_score <= value <= max_score:
            bad_range = True
        values.append(value)

    if not found:
        return ParsedScore(None, "no_score")
    if len(set(values)) > 1:
        return ParsedScore(None, "conflicting_scores")
    if bad_range:
        return ParsedScore(None, "out_of_range")
    if values:
        return ParsedScore(values[0], None)
    return ParsedScore(None, "not_a_number")
