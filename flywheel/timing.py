"""Time spent in model calls (generate, forward, train), so orchestration overhead can be measured.

    with timing.compute():
        model.generate(...)

`run_stage` resets the clock before a stage's work and records `compute_s` in the stage's stats; `bench/overhead.py`
compares an iteration's wall time with the sum of its stages' compute.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

_seconds = 0.0


@contextmanager
def compute() -> Iterator[None]:
    global _seconds
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _seconds += time.perf_counter() - t0


def reset() -> None:
    global _seconds
    _seconds = 0.0


def seconds() -> float:
    return _seconds
