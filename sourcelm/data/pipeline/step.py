"""The two kinds of pipeline step.

A `Step` looks at one document at a time (a filter or a mapper). A `GlobalStep` needs every
document (deduplication): it splits the pipeline into stages. The executor runs its `collect` per
task, its `resolve` once, then its `decide` per task, so the result does not depend on how many
workers ran.

Steps are built from the pipeline TOML through `STEP_TYPES` (in `sourcelm.data.pipeline.registry`): the
TOML `type` names the class and the remaining keys are its constructor's keyword arguments.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from pathlib import Path

from sourcelm.data.pipeline.document import Document


class Step:
    """A per-document step. `process` returns the (maybe modified) document, or a short snake_case
    drop reason ("too_few_words"); the pipeline records it as "name:reason"."""

    name: str = "step"

    def __init__(self) -> None:
        self.counters: collections.Counter = collections.Counter()

    def process(self, doc: Document) -> Document | str:
        raise NotImplementedError


class GlobalStep:
    """A step that needs all documents. Each phase reads and writes only under `work_dir`, so the
    phases may run in different processes or on different machines sharing that folder."""

    name: str = "global"

    def __init__(self) -> None:
        self.counters: collections.Counter = collections.Counter()

    def collect(self, docs: Iterable[Document], work_dir: Path, task: int) -> None:
        """Per-task pass: write this task's signatures/keys under work_dir."""
        raise NotImplementedError

    def resolve(self, work_dir: Path, num_tasks: int, workers: int) -> None:
        """The global stage: cluster, decide, write per-task decisions under work_dir."""
        raise NotImplementedError

    def decide(self, doc: Document, work_dir: Path, task: int) -> str | None:
        """Per-task pass: None keeps the document, a string is its drop reason ("near_duplicate")."""
        raise NotImplementedError
