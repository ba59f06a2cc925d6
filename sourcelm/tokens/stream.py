"""A virtual token stream: chosen documents of several shards, concatenated, read by offset.

The loader cuts windows out of such a stream. The stream is a table of segments (runs of adjacent
chosen documents in one shard), so selecting documents (a validation split, one source of a
mixture) costs one table, never a copy of the tokens.

Documents are taken as they are in the shards: shards written by `sourcelm tokenize` end every
document with `<|end_of_text|>`, so the concatenation already separates documents with EOS (the
same convention as Megatron's `preprocess_data.py --append-eod` and datatrove).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xxhash

from sourcelm.artifacts import atomic_write_bytes
from sourcelm.tokens.indexed import ShardReader

SOURCES_SUFFIX = ".sources.json"  # per-shard sidecar: the `source` of each document, run-length coded


def in_valid_split(key: bytes, fraction: float) -> bool:
    """Whether the item hashed by `key` belongs to the held-out split. A fixed hash (no seed), so
    the split does not move when the training seed does."""
    return fraction > 0 and xxhash.xxh3_64_intdigest(key) < fraction * 2.0**64


def write_doc_sources(prefix: str | Path, sources: list[str]) -> Path:
    """Writes the sidecar naming each document's source: {"names": [...], "runs": [[name, n], ...]}."""
    names: list[str] = []
    index: dict[str, int] = {}
    runs: list[list[int]] = []
    for s in sources:
        i = index.setdefault(s, len(names))
        if i == len(names):
            names.append(s)
        if runs and runs[-1][0] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    path = Path(str(prefix) + SOURCES_SUFFIX)
    atomic_write_bytes(path, (json.dumps({"names": names, "runs": runs}, separators=(",", ":")) + "\n").encode())
    return path


def read_doc_sources(prefix: str | Path, num_docs: int) -> tuple[list[str], np.ndarray] | None:
    """(names, per-document index into names), or None when the shard has no sidecar."""
    path = Path(str(prefix) + SOURCES_SUFFIX)
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    runs = np.asarray(d["runs"], dtype=np.int64).reshape(-1, 2)
    idx = np.repeat(runs[:, 0], runs[:, 1])
    if idx.size != num_docs:
        raise ValueError(f"{path}: names {idx.size} documents, the shard has {num_docs}")
    return list(d["names"]), idx


class TokenStream:
    """The chosen documents of `shards`, in shard order then document order, as one token array."""

    def __init__(self, shards: list[ShardReader], masks: list[np.ndarray | None]):
        self.shards = shards
        seg_shard, seg_start, seg_len = [], [], []
        for k, (shard, mask) in enumerate(zip(shards, masks)):
            if mask is None:  # the whole shard is one segment
                if shard.num_tokens:
                    seg_shard.append(np.array([k]))
                    seg_start.append(np.array([0]))
                    seg_len.append(np.array([shard.num_tokens]))
                continue
            offsets = shard.doc_offsets
            chosen = np.flatnonzero(mask & (np.diff(offsets) > 0))
            if not chosen.size:
                continue
            # merge runs of consecutive chosen documents into one segment each
            breaks = np.flatnonzero(np.diff(chosen) != 1) + 1
            first = chosen[np.r_[0, breaks]]
            last = chosen[np.r_[breaks - 1, chosen.size - 1]]
            seg_shard.append(np.full(first.size, k))
            seg_start.append(offsets[first])
            seg_len.append(offsets[last + 1] - offsets[first])
        cat = (lambda xs: np.concatenate(xs).astype(np.int64)) if seg_len else (lambda xs: np.zeros(0, np.int64))
        self.seg_shard, self.seg_start, self.seg_len = cat(seg_shard), cat(seg_start), cat(seg_len)
        self.seg_begin = np.zeros(self.seg_len.size + 1, dtype=np.int64)
        np.cumsum(self.seg_len, out=self.seg_begin[1:])
        self.num_tokens = int(self.seg_begin[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream as int64."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside a stream of {self.num_tokens}")
        out = np.empty(length, dtype=np.int64)
        seg = int(np.searchsorted(self.seg_begin, start, side="right")) - 1
        done = 0
        while done < length:
            inner = start + done - self.seg_begin[seg]
            take = min(length - done, int(self.seg_len[seg] - inner))
            src = self.seg_start[seg] + inner
            out[done: done + take] = self.shards[self.seg_shard[seg]].tokens[src: src + take]
            done += take
            seg += 1
        return out


def split_mask(shard: ShardReader, split: str, fraction: float) -> np.ndarray:
    """Documents of `shard` in `split` ("train" or "valid") when a `fraction` is held out by a hash
    of each document's tokens (for shards that were not written already split)."""
    held = np.fromiter(
        (in_valid_split(shard[d].astype("<i8").tobytes(), fraction) for d in range(len(shard))),
        dtype=bool, count=len(shard))
    return held if split == "valid" else ~held
