"""Progress bars for long stages (rich); quiet when output is not a terminal, e.g. in CI logs."""

from __future__ import annotations

from typing import Iterable, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")


def progress(items: list[T], description: str) -> Iterable[T]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as bar:
        yield from bar.track(items, description=description)


def grid_table(title: str, header: list[str], rows: list[list[str]]):
    """A rich Table of strings whose columns fold rather than cut (the summary, the report, the experiment)."""
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    return table
