"""Reading curated documents (`CURATED_DIR/documents/*.jsonl.zst`) for tokenizer training and
tokenization, streaming, with every unusable record skipped and counted with its reason."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

DOCUMENT_GLOB = "documents/*.jsonl.zst"


def document_files(curated_dir: str | Path) -> list[Path]:
    root = Path(curated_dir)
    files = sorted(root.glob(DOCUMENT_GLOB))
    if not files:
        raise FileNotFoundError(f"{root}: no {DOCUMENT_GLOB}; pass the output dir of `sourcelm curate`")
    return files


def curated_manifest(curated_dir: str | Path) -> list[Path]:
    """The curated dir's manifest, recorded as this stage's input (empty when it has none)."""
    path = Path(curated_dir) / "manifest.json"
    return [path] if path.exists() else []


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
