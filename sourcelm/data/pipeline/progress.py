"""A rich progress bar per stage: documents done, documents/s and ETA.

Stage 1's document count is unknown until its input is read, so its total is estimated from
the bytes of the tasks finished so far and refined as tasks finish; later stages know their
total (the documents the previous stage kept)."""

from __future__ import annotations

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


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} docs/s" if speed else "… docs/s", style="progress.data.speed")


class StageProgress:
    def __init__(self, label: str, total: int | None, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self.label = label
        self._bytes_total = None
        self._task_bytes: dict[int, int] = {}
        self._docs_done = 0
        self._bytes_done = 0

    def __enter__(self):
        if self.enabled:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      _RateColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                      TimeElapsedColumn(), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._progress.update(self._task, total=self._progress.tasks[0].completed)
            self._progress.__exit__(*exc)

    def estimate_from_bytes(self, total_bytes: int, task_bytes: dict[int, int]) -> None:
        self._bytes_total, self._task_bytes = total_bytes, task_bytes

    def advance(self, n: int) -> None:
        if self.enabled and n:
            self._progress.advance(self._task, n)

    def resume(self, finished: list[dict] | object) -> None:
        """Tasks finished in an earlier run count as done (without adding to the rate)."""
        for r in finished:
            self._account(r)
            if self.enabled:
                self._progress.update(self._task, completed=self._progress.tasks[0].completed + r["docs_seen"])
        self._refresh_total()

    def task_done(self, result: dict) -> None:
        self._account(result)
        self._refresh_total()

    def _account(self, result: dict) -> None:
        self._docs_done += result["docs_seen"]
        self._bytes_done += self._task_bytes.get(result["task"], 0)

    def _refresh_total(self) -> None:
        if self.enabled and self._bytes_total and self._bytes_done:
            est = int(self._docs_done * self._bytes_total / self._bytes_done)
            self._progress.update(self._task, total=max(est, self._progress.tasks[0].completed))
