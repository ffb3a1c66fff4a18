"""Near-duplicate detection by ROUGE-L, exact and fast enough for tens of thousands of prompts.

    index = NearDuplicateIndex(threshold=0.7)
    index.add(words("List three ways to save water"))
    index.best(words("List three easy ways to save water"))   # (0.92, 0): the highest ROUGE-L F and which prompt

Comparing a new prompt with every kept one costs an LCS per pair. Two exact bounds skip almost all of them, so the
answer is the same as the full scan's:
- length: F = 2*LCS/(la+lb) and LCS <= min(la, lb), so F >= t needs lb within [la*t/(2-t), la*(2-t)/t];
- overlap: LCS <= the multiset overlap o of the two word lists, so F >= t needs o >= t*(la+lb)/2 >= la*t/(2-t).
  A prompt with that much overlap shares at least one of ANY la - o_min + 1 of the query's words (prefix filtering,
  as in set-similarity joins), so we look only at prompts indexed under the query's rarest la - o_min + 1 words.
Words are made distinct by their occurrence number ("the#0", "the#1"), so multisets are handled as sets.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 between two token lists: the longest common subsequence against both lengths."""
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(b), lcs / len(a)
    return 2 * p * r / (p + r)


def _elements(words: list[str]) -> frozenset[str]:
    """The multiset of words as a set of distinct elements."""
    seen: Counter = Counter()
    out = []
    for w in words:
        out.append(f"{w}#{seen[w]}")
        seen[w] += 1
    return frozenset(out)


class NearDuplicateIndex:
    def __init__(self, threshold: float):
        self.t = threshold
        self.docs: list[list[str]] = []
        self.sets: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = defaultdict(list)
        self.lcs_computed = 0  # how many exact comparisons were needed (for the benchmark)

    def __len__(self) -> int:
        return len(self.docs)

    def add(self, words: list[str]) -> None:
        i = len(self.docs)
        self.docs.append(words)
        self.sets.append(_elements(words))
        for e in self.sets[i]:
            self.postings[e].append(i)

    def best(self, words: list[str]) -> tuple[float, int | None]:
        """The highest ROUGE-L F against an indexed prompt that could reach the threshold, and its index; (0, None)
        when none can. Scores below the threshold are not searched exhaustively."""
        la = len(words)
        if la == 0:
            return 0.0, None
        t = self.t
        o_min = max(1, math.ceil(la * t / (2 - t) - 1e-9))
        mine = _elements(words)
        rarest_first = sorted(mine, key=lambda e: (len(self.postings.get(e, ())), e))
        prefix = rarest_first[: la - o_min + 1]
        lo, hi = la * t / (2 - t) - 1e-9, la * (2 - t) / t + 1e-9
        best, which = 0.0, None
        seen: set[int] = set()
        for e in prefix:
            for i in self.postings.get(e, ()):
                if i in seen:
                    continue
                seen.add(i)
                doc = self.docs[i]
                lb = len(doc)
                if not lo <= lb <= hi:
                    continue
                overlap = len(mine & self.sets[i])
                if 2 * overlap / (la + lb) < t - 1e-12:
                    continue
                self.lcs_computed += 1
                score = rouge_l(words, doc)
                if score > best:
                    best, which = score, i
        return best, which
