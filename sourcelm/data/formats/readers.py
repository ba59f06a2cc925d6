"""Readers: WARC(.gz), JSONL(.gz/.zst), Parquet, and single HTML or text files.

Each reader yields `Document`s and, for what it cannot read, `Rejected` records with a short
reason; the pipeline writes those to the drop log as "read:<reason>" and goes on. A damaged file
(truncated gzip, corrupt zstd or Parquet, a malformed WARC record) ends that file, keeping what was
read before the damage. Ids are `make_doc_id(source, position)`: a rerun gives the same ids.

HTML documents carry `metadata["html"] = True` until the `extract` step turns them into text.
"""

from __future__ import annotations

import collections
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sourcelm.data.pipeline.document import Document, make_doc_id

HTML_TYPES = {"text/html", "application/xhtml+xml"}
TEXT_TYPES = {"text/plain"}
HTML_SUFFIXES = (".html", ".htm", ".xhtml", ".shtml")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
FORMATS = ("warc", "jsonl", "parquet", "html", "text")


@dataclass
class Rejected:
    id: str
    source: str
    url: str | None
    reason: str


def detect_format(path: str | Path) -> str | None:
    name = str(path).lower()
    for comp in (".gz", ".zst", ".zstd"):
        if name.endswith(comp):
            name = name[: -len(comp)]
            break
    if name.endswith((".warc", ".arc")):
        return "warc"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(HTML_SUFFIXES):
        return "html"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


# errors that mean "this compressed stream is damaged": the rest of the file is lost
def _stream_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, OSError)


class TruncatedStream(EOFError):
    pass


class _ZstdFrames(io.RawIOBase):
    """Decompresses a file of one or more zstd frames and, unlike a plain stream reader, raises
    `TruncatedStream` when the file ends inside a frame (a truncated download or write)."""

    def __init__(self, path: Path):
        import zstandard

        self._zstd = zstandard
        self._raw = open(path, "rb")
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._buf = b""
        self._in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            chunk = self._raw.read(1 << 18)
            if not chunk:
                if self._in_frame:
                    raise TruncatedStream("zstd stream ends inside a frame")
                return 0
            while chunk:
                self._in_frame = True
                self._buf += self._dobj.decompress(chunk)
                if self._dobj.eof:  # frame complete: the rest starts a new one
                    chunk = self._dobj.unused_data
                    self._dobj = self._zstd.ZstdDecompressor().decompressobj()
                    self._in_frame = False
                else:
                    chunk = b""
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_binary(path: Path) -> io.BufferedIOBase:
    """The decompressed byte stream of `path` (gzip and zstd by suffix)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFrames(path), buffer_size=1 << 18)
    return open(path, "rb")


def read_file(path: Path, source: str, fmt: str, counters: collections.Counter,
              text_key: str = "text", url_key: str = "url", max_line_bytes: int = 64 << 20,
              max_file_bytes: int = 64 << 20) -> Iterator[Document | Rejected]:
    if path.stat().st_size == 0:
        yield Rejected(make_doc_id(source, "file"), source, None, "empty_file")
        return
    if fmt == "warc":
        yield from read_warc(path, source, counters)
    elif fmt == "jsonl":
        yield from read_jsonl(path, source, text_key, url_key, max_line_bytes)
    elif fmt == "parquet":
        yield from read_parquet(path, source, text_key, url_key)
    elif fmt in ("html", "text"):
        yield from read_single(path, source, fmt, max_file_bytes)
    else:
        raise ValueError(f"unknown input format {fmt!r}; use one of {FORMATS}")


def _content_type(http_headers) -> tuple[str, str | None]:
    value = (http_headers.get_header("Content-Type") or "") if http_headers else ""
    parts = [p.strip() for p in value.split(";")]
    charset = None
    for p in parts[1:]:
        if p.lower().startswith("charset="):
            charset = p[8:].strip("\"' ") or None
    return parts[0].lower(), charset


def decode_html(data: bytes, charset: str | None) -> str:
    """Decodes with the declared charset, else a detected one; bad bytes are dropped, not fatal."""
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    if charset:
        try:
            return data.decode(charset)
        except (LookupError, UnicodeDecodeError):
            pass
    return bytes_to_str(data, detect_encoding(data))


def read_warc(path: Path, source: str, counters: collections.Counter) -> Iterator[Document | Rejected]:
    """Response records whose HTTP Content-Type is HTML/XHTML (or plain text), status 2xx.
    The HTTP header is trusted over any sniffing, so XHTML pages are kept."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    position = 0
    url = None
    with open(path, "rb") as raw:
        try:
            for position, record in enumerate(ArchiveIterator(raw, arc2warc=True)):
                if record.rec_type != "response":
                    continue
                url = record.rec_headers.get_header("WARC-Target-URI")
                http = record.http_headers
                if http is None:
                    counters["skipped_not_http"] += 1
                    continue
                status = http.get_statuscode() or ""
                if not status.startswith("2"):
                    counters["skipped_status"] += 1
                    continue
                ctype, charset = _content_type(http)
                if ctype not in HTML_TYPES and ctype not in TEXT_TYPES:
                    counters["skipped_content_type"] += 1
                    continue
                data = record.content_stream().read()
                doc_id = make_doc_id(source, position)
                if getattr(record.raw_stream, "limit", 0) > 0:  # the file ends inside this record
                    yield Rejected(doc_id, source, url, "truncated_record")
                    continue
                if not data.strip():
                    yield Rejected(doc_id, source, url, "empty_record")
                    continue
                meta = {"content_type": ctype}
                date = record.rec_headers.get_header("WARC-Date")
                if date:
                    meta["date"] = date
                if ctype in HTML_TYPES:
                    meta["html"] = True
                    text = decode_html(data, charset)
                else:
                    text = data.decode(charset or "utf-8", errors="replace")
                yield Document(doc_id, text, source, url, meta)
        except ArchiveLoadFailed:
            yield Rejected(make_doc_id(source, f"error@{position}"), source, url, "malformed_warc_record")
        except _stream_errors():
            yield Rejected(make_doc_id(source, f"error@{position}"), source, url, "truncated_or_corrupt_file")
        except (ValueError, AttributeError, TypeError, KeyError, IndexError):
            # warcio meets some malformed headers with these rather than ArchiveLoadFailed
            yield Rejected(make_doc_id(source, f"error@{position}"), source, url, "malformed_warc_record")


def _record_to_doc(rec, source: str, position: int, text_key: str, url_key: str) -> Document | Rejected:
    doc_id = make_doc_id(source, position)
    if not isinstance(rec, dict):
        return Rejected(doc_id, source, None, "not_an_object")
    url = rec.get(url_key)
    if url is not None and not isinstance(url, str):
        return Rejected(doc_id, source, None, "url_not_a_string")
    if text_key not in rec or rec[text_key] is None:
        return Rejected(doc_id, source, url, "missing_text")
    text = rec[text_key]
    if not isinstance(text, str):
        return Rejected(doc_id, source, url, "text_not_a_string")
    if not text.strip():
        return Rejected(doc_id, source, url, "empty_text")
    meta = rec.get("metadata")
    meta = dict(meta) if isinstance(meta, dict) else {}
    for k, v in rec.items():
        if k not in (text_key, url_key, "metadata", "id", "source"):
            meta[k] = v
    for key in ("id", "source"):  # upstream values are kept beside ours
        if key in rec:
            meta[f"input_{key}"] = str(rec[key])
    return Document(doc_id, text, source, url, meta)


def read_jsonl(path: Path, source: str, text_key: str, url_key: str,
               max_line_bytes: int) -> Iterator[Document | Rejected]:
    line_no = 0
    try:
        with open_binary(path) as f:
            while True:
                line = f.readline(max_line_bytes + 1)
                if not line:
                    break
                line_no += 1
                if len(line) > max_line_bytes:  # skip the rest of the gigantic line, a chunk at a time
                    while line and not line.endswith(b"\n"):
                        line = f.readline(1 << 20)
                    yield Rejected(make_doc_id(source, line_no), source, None, "line_too_long")
                    continue
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.decode("utf-8"))
                except UnicodeDecodeError:
                    yield Rejected(make_doc_id(source, line_no), source, None, "invalid_utf8")
                    continue
                except ValueError:
                    yield Rejected(make_doc_id(source, line_no), source, None, "invalid_json")
                    continue
                yield _record_to_doc(rec, source, line_no, text_key, url_key)
    except _stream_errors():
        yield Rejected(make_doc_id(source, f"error@{line_no}"), source, None, "truncated_or_corrupt_file")


def read_parquet(path: Path, source: str, text_key: str, url_key: str) -> Iterator[Document | Rejected]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                row += 1
                yield _record_to_doc(rec, source, row, text_key, url_key)
    except (pa.ArrowException, OSError):
        yield Rejected(make_doc_id(source, f"error@{row}"), source, None, "corrupt_parquet")


def read_single(path: Path, source: str, fmt: str, max_file_bytes: int) -> Iterator[Document | Rejected]:
    doc_id = make_doc_id(source, 0)
    if path.stat().st_size > max_file_bytes:
        yield Rejected(doc_id, source, None, "file_too_large")
        return
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        yield Rejected(doc_id, source, None, "binary_file")
        return
    if fmt == "html":
        yield Document(doc_id, decode_html(data, None), source, None, {"html": True})
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        yield Rejected(doc_id, source, None, "invalid_utf8")
        return
    if not text.strip():
        yield Rejected(doc_id, source, None, "empty_text")
        return
    yield Document(doc_id, text, source, None, {})
