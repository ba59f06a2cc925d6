"""Token shards: Megatron-LM's memory-mapped indexed dataset (`.bin` + `.idx`).

We write exactly what Megatron-LM's `indexed_dataset.py` reads (and what datatrove and NeMo
Curator write), so shards made here train in those stacks and theirs train here.

`PREFIX.bin` holds the token ids of every sequence back to back, in the shard's dtype, native
little-endian. `PREFIX.idx` (all integers little-endian):

    9 bytes   magic  b"MMIDIDX\\x00\\x00"
    uint64    version, always 1
    uint8     dtype code (Megatron's table below)
    uint64    S = number of sequences
    uint64    D = number of entries in the document index (= documents + 1)
    int32[S]  sequence lengths, in tokens
    int64[S]  sequence pointers: byte offset of each sequence in the .bin
    int64[D]  document index: document d is sequences [doc_idx[d], doc_idx[d+1]); doc_idx[0] = 0

We write one sequence per document (what Megatron's `preprocess_data.py` does without sentence
splitting), so the document index is 0, 1, ..., S. The reader also accepts shards whose documents
span several sequences.
"""

from __future__ import annotations

import os
import struct
from array import array
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1

# Megatron-LM's DType enum (megatron/core/datasets/indexed_dataset.py). It has no uint32 code, so a
# vocabulary too large for uint16 is stored as int32 (code 4), as Megatron itself does.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    6: np.dtype(np.float64),
    7: np.dtype(np.float32),
    8: np.dtype(np.uint16),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}

_HEAD = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else int32 (Megatron has no uint32 code)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 31:
        return np.dtype(np.int32)
    raise ValueError(f"vocab_size {vocab_size} does not fit Megatron's int32 token dtype")


def shard_paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


class ShardWriter:
    """Streams documents into `PREFIX.bin`; `finalize()` writes `PREFIX.idx`.

    Both files are written under temporary names and renamed at `finalize()`, so a shard that exists
    under its final name is complete. Use as a context manager, or call `finalize()` yourself;
    leaving the block with an exception removes the temporary files.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint16):
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no Megatron dtype code")
        self.bin_path, self.idx_path = shard_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._bin = open(self._bin_tmp, "wb")
        self._lengths = array("q")
        self.num_tokens = 0
        self._limit = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None

    def add_document(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError("a document is a 1-D sequence of token ids")
        if arr.size and self._limit is not None and (arr.min() < 0 or arr.max() > self._limit):
            raise ValueError(f"token id outside the range of {self.dtype}")
        if arr.size >= 1 << 31:
            raise ValueError("a document longer than 2^31 - 1 tokens cannot be indexed (int32 lengths)")
        self._bin.write(arr.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        self._lengths.append(arr.size)
        self.num_tokens += arr.size

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def finalize(self) -> tuple[Path, Path]:
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if self._lengths else np.zeros(0, np.int64)
        count = lengths.size
        pointers = np.zeros(count, dtype="<i8")
        if count:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.arange(count + 1, dtype="<i8")
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEAD.pack(MAGIC, VERSION, _CODE_OF[self.dtype], count, doc_index.size))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.tobytes())
            f.write(doc_index.tobytes())
        _fsync_replace(self._bin_tmp, self.bin_path)
        _fsync_replace(self._idx_tmp, self.idx_path)
        return self.bin_path, self.idx_path

    def abort(self) -> None:
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)
        self._idx_tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()


class ShardReader:
    """A memory-mapped shard. `reader[d]` is document d's tokens (a read-only view, shard dtype)."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = shard_paths(prefix)
        raw = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        if raw.size < _HEAD.size:
            raise ValueError(f"{self.idx_path}: too short for a Megatron index header")
        magic, version, code, seq_count, doc_count = _HEAD.unpack(raw[: _HEAD.size].tobytes())
        if magic != MAGIC:
            raise ValueError(f"{self.idx_path}: not a Megatron index (magic {magic!r})")
        if version != VERSION:
            raise ValueError(f"{self.idx_path}: index version {version}, only 1 is supported")
        if code not in DTYPE_CODES:
            raise ValueError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = DTYPE_CODES[code]
        need = _HEAD.size + seq_count * (4 + 8) + doc_count * 8
        if raw.size < need:
            raise ValueError(f"{self.idx_path}: truncated ({raw.size} bytes, header says {need})")
        off = _HEAD.size
        self.sequence_lengths = np.frombuffer(raw, dtype="<i4", count=seq_count, offset=off)
        off += 4 * seq_count
        self.sequence_pointers = np.frombuffer(raw, dtype="<i8", count=seq_count, offset=off)
        off += 8 * seq_count
        self.document_index = np.frombuffer(raw, dtype="<i8", count=doc_count, offset=off)
        self.num_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = self.bin_path.stat().st_size
        if bin_size != self.num_tokens * self.dtype.itemsize:
            raise ValueError(f"{self.bin_path}: {bin_size} bytes, the index describes "
                             f"{self.num_tokens} tokens of {self.dtype}")
        if bin_size:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")
        else:  # numpy cannot map an empty file
            self.tokens = np.zeros(0, dtype=self.dtype)
        # token offset where each document starts, plus the end (documents are contiguous)
        starts = self.sequence_pointers // self.dtype.itemsize
        di = self.document_index
        self.doc_offsets = np.empty(di.size, dtype=np.int64)
        if di.size:
            self.doc_offsets[:-1] = starts[di[:-1]] if seq_count else 0
            self.doc_offsets[-1] = self.num_tokens

    def __len__(self) -> int:
        return max(0, self.document_index.size - 1)

    def __getitem__(self, doc: int) -> np.ndarray:
        n = len(self)
        if not -n <= doc < n:
            raise IndexError(f"document {doc} out of range for {n} documents")
        doc %= n
        return self.tokens[self.doc_offsets[doc]: self.doc_offsets[doc + 1]]

    def document_lengths(self) -> np.ndarray:
        return np.diff(self.doc_offsets)


def find_shards(path: str | Path) -> list[str]:
    """A shard prefix (with or without .bin/.idx) or a directory of shards -> sorted prefixes."""
    p = Path(path)
    if p.is_dir():
        prefixes = sorted(str(i.with_suffix("")) for i in p.glob("*.idx"))
        if not prefixes:
            raise FileNotFoundError(f"{p}: a directory with no .idx shards")
        return prefixes
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    if not Path(str(p) + ".idx").exists():
        raise FileNotFoundError(f"{p}: no shard {p}.idx")
    return [str(p)]
