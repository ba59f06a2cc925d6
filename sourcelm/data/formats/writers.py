"""Writers: JSONL.zst shards (default) and Parquet, plus the drop log.

Every file is written under a temporary name and renamed into place when complete, so a crash
never leaves a half-written shard where a finished one is expected. Output bytes depend only on
the documents (fixed zstd level, single-threaded; fixed Parquet options), which makes the local
and Ray executors' outputs byte-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sourcelm.data.pipeline.document import Document

ZSTD_LEVEL = 3
FORMATS = {"jsonl.zst": ".jsonl.zst", "parquet": ".parquet"}


def dumps(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8", "surrogatepass")


class JsonlZstWriter:
    def __init__(self, path: Path):
        import zstandard

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._file = open(self.tmp, "wb")
        self._zst = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0).stream_writer(self._file, closefd=False)
        self.count = 0

    def write(self, record: dict) -> None:
        self._zst.write(dumps(record))
        self.count += 1

    def close(self) -> Path:
        self._zst.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


class ParquetDocWriter:
    """Columns id, text, source, url and metadata (a JSON string: metadata keys vary by source)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.rows: dict[str, list] = {"id": [], "text": [], "source": [], "url": [], "metadata": []}
        self.count = 0

    def write(self, record: dict) -> None:
        for k in ("id", "text", "source", "url"):
            self.rows[k].append(record[k])
        self.rows["metadata"].append(json.dumps(record["metadata"], ensure_ascii=False, sort_keys=True))
        self.count += 1

    def close(self) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(k, pa.string()) for k in self.rows])
        pq.write_table(pa.table(self.rows, schema=schema), self.tmp, compression="zstd")
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


def open_writer(path: Path, fmt: str):
    if fmt == "jsonl.zst":
        return JsonlZstWriter(path)
    if fmt == "parquet":
        return ParquetDocWriter(path)
    raise ValueError(f"output format {fmt!r}: use one of {sorted(FORMATS)}")


class ShardWriter:
    """The documents of one task: `<dir>/<task>.<ext>`, or with `split_by` (a metadata key such as
    "language") `<dir>/<value>/<task>.<ext>`. Files appear only when `close` succeeds."""

    def __init__(self, directory: Path, task: int, fmt: str = "jsonl.zst", split_by: str | None = None):
        self.directory, self.task, self.fmt, self.split_by = Path(directory), task, fmt, split_by
        self.writers: dict[str | None, object] = {}
        if split_by is None:  # an unsplit task always has its shard, even an empty one
            self._writer(None)

    def _writer(self, key: str | None):
        w = self.writers.get(key)
        if w is None:
            folder = self.directory if key is None else self.directory / _safe(key)
            w = self.writers[key] = open_writer(folder / f"{self.task:05d}{FORMATS[self.fmt]}", self.fmt)
        return w

    def shard_of(self, doc: Document) -> str:
        key = None if self.split_by is None else str(doc.metadata.get(self.split_by, "unknown"))
        folder = self.directory if key is None else self.directory / _safe(key)
        return str(folder / f"{self.task:05d}{FORMATS[self.fmt]}")

    def write(self, doc: Document) -> None:
        key = None if self.split_by is None else str(doc.metadata.get(self.split_by, "unknown"))
        self._writer(key).write(doc.to_dict())

    def close(self) -> list[Path]:
        return [w.close() for _, w in sorted(self.writers.items(), key=lambda kv: str(kv[0]))]

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:64] or "unknown"


def read_jsonl_zst(path: Path):
    """Yields the records of a JSONL.zst file (our own outputs: trusted to be well formed)."""
    import io

    import zstandard

    with open(path, "rb") as raw:
        reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        for line in reader:
            if line.strip():
                yield json.loads(line)
