"""The rich progress bar used by the tokenizer and tokenization commands (rate and ETA)."""

from __future__ import annotations

import contextlib

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, in the task's `unit` field (files, docs, tokens)."""

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s")


class _Silent:
    """Same interface as rich's Progress, showing nothing (tests, benchmarks)."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def advance(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def progress_bar(show: bool = True):
    if not show:
        yield _Silent()
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()) as progress:
        yield progress
