"""Exact deduplication on normalised text, and the decision files all dedup steps share.

Normalisation (so trivially different copies count as the same text): Unicode NFKC (full-width
and compatibility forms folded), lowercase, every run of whitespace (spaces, tabs, newlines,
non-breaking spaces) collapsed to one space, leading and trailing whitespace removed. Digits and
punctuation are kept, so "version 2" and "version 3" stay different documents. A document whose
normalised text is empty is never a duplicate (the quality filters deal with it).

Each task hashes its documents' normalised text with xxh3-128 (two uint64 columns: a collision is
a 2^-128 event) into `exact_TTTTT.npy`, ids in `exact_ids_TTTTT.json`. The global stage sorts all
keys with `np.lexsort` (stable, so among equal texts the first in input order, i.e. smallest
(task, position), comes first), keeps that first copy and drops the rest as "exact_duplicate".
Decisions go to `drop_TTTTT.json` ({dropped id: kept id}), read back by `decide`.
"""

from __future__ import annotations

import json
import os
import re
import time
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import xxhash

from sourcelm.artifacts import atomic_write_bytes
from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import GlobalStep

_SPACES = re.compile(r"\s+")


def normalize_for_exact(text: str) -> str:
    """NFKC, lowercase, whitespace runs collapsed to one space, stripped; digits kept."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def save_npy(path: Path, arr: np.ndarray) -> None:
    """np.save, atomically (temp file + rename), without pickle."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n").encode())


class DedupStep(GlobalStep):
    """Shared by the dedup steps: per-task decision files {dropped id: kept id}, and `decide`."""

    reason = "duplicate"

    def __init__(self) -> None:
        super().__init__()
        self._drops: tuple[int, dict[str, str]] | None = None  # (task, decisions): one task at a time

    @staticmethod
    def write_decisions(work_dir: Path, offsets: np.ndarray, ids: list[str], labels: np.ndarray) -> int:
        """labels[i] = global position of the copy kept for document i (i itself when kept).
        Writes drop_TTTTT.json per task; returns the number of dropped documents."""
        num_tasks = offsets.size - 1
        dup = np.flatnonzero(labels != np.arange(labels.size))
        task_of = np.searchsorted(offsets, dup, side="right") - 1
        drops: list[dict[str, str]] = [{} for _ in range(num_tasks)]
        for pos, task, kept in zip(dup.tolist(), task_of.tolist(), labels[dup].tolist()):
            drops[task][ids[pos]] = ids[kept]
        for task in range(num_tasks):
            write_json(work_dir / f"drop_{task:05d}.json", drops[task])
        return int(dup.size)

    def decide(self, doc: Document, work_dir: Path, task: int) -> str | None:
        if self._drops is None or self._drops[0] != task:
            path = Path(work_dir) / f"drop_{task:05d}.json"
            if not path.exists():
                raise FileNotFoundError(f"{path}: the {self.name} global stage (resolve) has not run")
            self._drops = (task, json.loads(path.read_text()))
        if doc.id in self._drops[1]:
            self.counters[self.reason] += 1
            return self.reason
        return None


def load_task_ids(work_dir: Path, prefix: str, num_tasks: int) -> list[dict]:
    """The per-task JSON sidecars written by collect, in task order; a missing one is an error
    that names the task."""
    metas = []
    for task in range(num_tasks):
        path = work_dir / f"{prefix}_{task:05d}.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: task {task} has not been collected; run its collect first")
        metas.append(json.loads(path.read_text()))
    return metas


class ExactDedup(DedupStep):
    """Drops every document whose normalised text equals an earlier document's. No parameters."""

    name = "exact_dedup"
    reason = "exact_duplicate"

    def collect(self, docs: Iterable[Document], work_dir: Path, task: int) -> None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        ids, keys, empty = [], [], []
        for i, doc in enumerate(docs):
            norm = normalize_for_exact(doc.text)
            ids.append(doc.id)
            if not norm:
                empty.append(i)
            keys.append(xxhash.xxh3_128_digest(norm.encode()))
        arr = np.frombuffer(b"".join(keys), dtype="<u8").reshape(len(ids), 2)
        self.counters["docs"] += len(ids)
        self.counters["empty"] += len(empty)
        save_npy(work_dir / f"exact_{task:05d}.npy", arr)
        write_json(work_dir / f"exact_ids_{task:05d}.json", {"ids": ids, "empty": empty})

    def resolve(self, work_dir: Path, num_tasks: int, workers: int = 1) -> None:
        work_dir = Path(work_dir)
        t0 = time.perf_counter()
        metas = load_task_ids(work_dir, "exact_ids", num_tasks)
        counts = np.array([len(m["ids"]) for m in metas], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        n = int(offsets[-1])
        keys = (np.concatenate([np.load(work_dir / f"exact_{t:05d}.npy") for t in range(num_tasks)])
                if num_tasks else np.empty((0, 2), dtype="<u8"))
        valid = np.ones(n, dtype=bool)
        for t, m in enumerate(metas):
            valid[offsets[t] + np.asarray(m["empty"], dtype=np.int64)] = False
        pos = np.flatnonzero(valid)
        order = pos[np.lexsort((keys[pos, 1], keys[pos, 0]))]  # stable: equal texts stay in input order
        sk = keys[order]
        starts = np.ones(order.size, dtype=bool)
        starts[1:] = np.any(sk[1:] != sk[:-1], axis=1)
        group_first = order[np.flatnonzero(starts)[np.cumsum(starts) - 1]]
        labels = np.arange(n, dtype=np.int64)
        labels[order] = group_first
        ids = [i for m in metas for i in m["ids"]]
        dropped = self.write_decisions(work_dir, offsets, ids, labels)
        write_json(work_dir / "exact_stats.json",
                   {"docs": n, "empty": int(n - pos.size), "exact_duplicates": dropped,
                    "seconds": time.perf_counter() - t0})
        self.counters["exact_duplicates"] += dropped
