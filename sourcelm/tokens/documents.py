"""Reading documents for tokenizer training and tokenization, streaming, with every unusable record skipped and
counted with its reason.

Two kinds of input (`DocumentInput`):
- what `sourcelm curate` writes: CURATED_DIR/documents/*.jsonl.zst, `{id, text, source, ...}` per line;
- what people have: a file or a folder of plain JSONL (.jsonl, .jsonl.gz, .jsonl.zst; the text under `text` or
  another key), Parquet (a `text` column) and text files (.txt, .md, .rst: one document per file). These go through
  curation's own readers (`sourcelm.data.formats.readers`), so a damaged file, a line that is not JSON, a record
  without its text or with an empty one is skipped, counted and logged with curation's reason. A JSONL or Parquet
  file is one unit of work (one task, one shard); so is each folder's set of text files. A document's source is
  its unit's path under the input (suffixes dropped), its id a hash of (source, position), stable across reruns.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sourcelm.artifacts import sha256_file

log = logging.getLogger(__name__)

DOCUMENT_GLOB = "documents/*.jsonl.zst"
FILE_FORMATS = ("jsonl", "parquet")  # a unit each; text files are grouped by folder


@dataclass(frozen=True)
class DocumentInput:
    """`--input` of `tokenizer train` / `tokenize`: a curated dir, or plain JSONL / Parquet / text (a file or a
    folder). Picklable: tokenization tasks receive it."""

    root: Path
    text_key: str = "text"  # plain JSONL and Parquet: the field holding the text

    @property
    def curated(self) -> bool:
        return self.root.is_dir() and any(self.root.glob(DOCUMENT_GLOB))

    def units(self) -> list[Path]:
        """The units of work: curated shards, plain JSONL / Parquet files, folders of text files."""
        from sourcelm.data.formats.readers import detect_format

        if self.curated:
            return sorted(self.root.glob(DOCUMENT_GLOB))
        if self.root.is_file():
            candidates = [self.root]
        elif self.root.is_dir():
            candidates = sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            raise FileNotFoundError(f"{self.root}: no such file or directory")
        files = [p for p in candidates if detect_format(p) in FILE_FORMATS]
        text_dirs = sorted({p.parent for p in candidates if detect_format(p) == "text"})
        if self.root.is_file() and detect_format(self.root) == "text":
            raise ValueError(f"{self.root}: give the folder of text files, not one of them")
        if not files and not text_dirs:
            raise FileNotFoundError(
                f"{self.root}: no documents; pass the output dir of `sourcelm curate`, or JSONL (.jsonl, .jsonl.gz, "
                f".jsonl.zst), Parquet or text files (.txt, .md, .rst), one file or a folder of them")
        return files + text_dirs

    def label(self, unit: Path) -> str:
        """The unit's path under the input (plain inputs: without format suffixes, their documents' source)."""
        if self.curated:
            return unit.relative_to(self.root).as_posix()
        rel = unit.relative_to(self.root) if unit != self.root else Path(unit.name)
        name = rel.as_posix() if str(rel) != "." else self.root.name
        for suffix in (".gz", ".zst", ".zstd", ".jsonl", ".ndjson", ".json", ".parquet"):
            name = name.removesuffix(suffix)
        return name

    def task_name(self, unit: Path) -> str:
        """The name of the unit's task and shards: the file name for curated shards, else the label, flattened."""
        return unit.name.removesuffix(".jsonl.zst") if self.curated else self.label(unit).replace("/", "__")

    def documents(self, unit: Path, skipped: Counter | None = None, skip_log: list | None = None) -> Iterator[dict]:
        """The usable documents of one unit, in order, as `{id, text, source, url, metadata}`."""
        if self.curated:
            yield from iter_documents(unit, skipped, skip_log)
            return
        from sourcelm.data.formats.readers import Rejected, detect_format, read_file

        skipped = skipped if skipped is not None else Counter()
        source = self.label(unit)
        files = sorted(p for p in unit.iterdir() if p.is_file() and detect_format(p) == "text") if unit.is_dir() \
            else [unit]
        for path in files:
            # a text file's documents take their id from the file: one per file, and each file is position 0
            id_source = f"{source}/{path.name}" if unit.is_dir() else source
            for item in read_file(path, id_source, detect_format(path), Counter(), text_key=self.text_key):
                reason = item.reason if isinstance(item, Rejected) else _unencodable(item.text)
                if reason:
                    skipped[reason] += 1
                    log.info("%s: document %s skipped (%s)", path, item.id, reason)
                    if skip_log is not None:
                        skip_log.append({"file": str(path), "id": item.id, "reason": reason})
                    continue
                yield {"id": item.id, "text": item.text, "source": source, "url": item.url, "metadata": item.metadata}

    def unit_sha256(self, unit: Path) -> str:
        """A unit's content hash: the file's SHA-256, or for a folder of text files a hash of (name, SHA-256)."""
        if unit.is_file():
            return sha256_file(unit)
        h = hashlib.sha256()
        for path in self.provenance_inputs([unit]):
                h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
        return h.hexdigest()

    def provenance_inputs(self, units: list[Path]) -> list[Path]:
        """What the stage's manifest records as read: the curated dir's manifest, or every plain input file."""
        if self.curated:
            path = self.root / "manifest.json"
            return [path] if path.exists() else []
        from sourcelm.data.formats.readers import detect_format

        return sorted(p for u in units for p in ([u] if u.is_file() else u.iterdir())
                      if p.is_file() and (u.is_file() or detect_format(p) == "text"))


def _unencodable(text: str) -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON ("\ud800"): no byte form
        return "invalid_unicode"
    return None


def language_of(metadata: dict) -> str:
    lang = metadata.get("language", metadata.get("lang")) if isinstance(metadata, dict) else None
    return str(lang) if lang else "unknown"


def _check(line: bytes) -> tuple[dict | None, str | None]:
    """(document, None) or (None, skip reason)."""
    try:
        text_line = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        d = json.loads(text_line)
    except json.JSONDecodeError:
        return None, "malformed_json"
    if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not isinstance(d.get("text"), str):
        return None, "missing_id_or_text"
    if not isinstance(d.get("source", ""), str):
        return None, "malformed_source"
    try:
        d["text"].encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON ("\ud800"): no byte form
        return None, "invalid_unicode"
    if not d["text"]:
        return None, "empty"
    return d, None


def iter_documents(path: str | Path, skipped: Counter | None = None,
                   skip_log: list | None = None) -> Iterator[dict]:
    """Yields the usable documents of one `.jsonl.zst` file in order. Unusable lines are counted in
    `skipped` by reason and, with their line number and id when known, appended to `skip_log`. A
    truncated or corrupt zstd stream ends the file there (counted as `corrupt_stream`)."""
    import zstandard

    from sourcelm.data.formats.readers import open_binary  # the curated shards' reader: it notices a cut-off frame

    skipped = skipped if skipped is not None else Counter()
    with open_binary(Path(path)) as reader:
        lineno = 0
        while True:
            try:
                line = reader.readline()
            except (zstandard.ZstdError, EOFError) as e:
                skipped["corrupt_stream"] += 1
                log.warning("%s: zstd stream corrupt after line %d (%s); the rest is skipped", path, lineno, e)
                if skip_log is not None:
                    skip_log.append({"file": str(path), "line": lineno + 1, "reason": "corrupt_stream"})
                return
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            doc, reason = _check(line.rstrip(b"\n"))
            if reason:
                skipped[reason] += 1
                if skip_log is not None:
                    doc_id = None
                    if reason in ("empty", "invalid_unicode"):
                        doc_id = json.loads(line).get("id")
                    skip_log.append({"file": str(path), "line": lineno, "id": doc_id, "reason": reason})
                continue
            yield doc
