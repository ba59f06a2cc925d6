"""Steps for quick runs: a deterministic random sample, and a per-task document limit."""

from __future__ import annotations

import xxhash

from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step


class Sample(Step):
    """Keeps each document with probability `rate`, decided by a hash of (seed, id): the same
    documents are kept on every run and with any number of workers."""

    name = "sample"

    def __init__(self, rate: float, seed: int = 0):
        super().__init__()
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate={rate}: must be between 0 and 1")
        self.cut = int(rate * 2**64)
        self.seed = seed

    def process(self, doc: Document) -> Document | str:
        return doc if xxhash.xxh3_64_intdigest(doc.id.encode(), seed=self.seed) < self.cut else "not_sampled"


class Limit(Step):
    """Keeps the first `per_task` documents of each task (tasks are input-file groups, so the
    result does not depend on the number of workers)."""

    name = "limit"

    def __init__(self, per_task: int):
        super().__init__()
        if per_task < 0:
            raise ValueError(f"per_task={per_task}: must be >= 0")
        self.per_task = per_task
        self.seen = 0

    def process(self, doc: Document) -> Document | str:
        self.seen += 1
        return doc if self.seen <= self.per_task else "over_limit"
