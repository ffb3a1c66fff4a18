"""Progress bars for long stages (rich); quiet when output is not a terminal, e.g. in CI logs."""

from __future__ import annotations

from typing import Iterable, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress(items: list[T], description: str) -> Iterable[T]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        yield from bar.track(items, description=description)
