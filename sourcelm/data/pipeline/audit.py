"""`sourcelm audit DOC_ID --run DIR`: what happened to one document in a curation run."""

from __future__ import annotations

import io
import json
from pathlib import Path


def _lines(path: Path):
    import zstandard

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for rec in pq.read_table(path).to_pylist():
            yield None, rec
        return
    with open(path, "rb") as raw:
        reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
        yield from enumerate(reader, 1)


def find_document(run: Path, doc_id: str) -> dict | None:
    """{"fate": "kept", "shard", "line", "document"} or {"fate": "dropped", "reason", "record"}, or None."""
    needle = f'"id":"{doc_id}"'.encode()
    for path in sorted((run / "drops").glob("*.jsonl.zst")):
        for n, line in _lines(path):
            if needle in line:
                rec = json.loads(line)
                if rec["id"] == doc_id:
                    step, _, reason = rec["reason"].partition(":")
                    return {"fate": "dropped", "step": step, "reason": reason, "record": rec,
                            "log": str(path.relative_to(run)), "line": n}
    for path in sorted(p for p in (run / "documents").rglob("*") if p.is_file() and not p.name.startswith(".")):
        for n, line in _lines(path):
            if n is None:
                if line["id"] == doc_id:
                    return {"fate": "kept", "shard": str(path.relative_to(run)), "line": None, "document": line}
            elif needle in line:
                rec = json.loads(line)
                if rec["id"] == doc_id:
                    return {"fate": "kept", "shard": str(path.relative_to(run)), "line": n, "document": rec}
    return None


def audit(run: str | Path, doc_id: str) -> tuple[int, str]:
    """(exit code, report text)."""
    run = Path(run)
    if not (run / "documents").is_dir() and not (run / "drops").is_dir():
        return 2, f"{run}: not a curation run folder (no documents/ or drops/)"
    found = find_document(run, doc_id)
    if found is None:
        return 1, f"{doc_id}: not in this run (neither kept nor in the drop log)"
    if found["fate"] == "dropped":
        rec = found["record"]
        where = "while reading its input" if found["step"] == "read" else f"by step `{found['step']}`"
        return 0, (f"{doc_id}: DROPPED {where}: {found['reason']}\n  source: {rec['source']}\n"
                   f"  url:    {rec.get('url')}\n  logged in {found['log']} line {found['line']}")
    doc = found["document"]
    meta = doc["metadata"] if isinstance(doc["metadata"], dict) else json.loads(doc["metadata"])
    preview = doc["text"][:200].replace("\n", " ")
    return 0, (f"{doc_id}: KEPT in {found['shard']}" + (f" line {found['line']}" if found["line"] else "") +
               f"\n  source: {doc['source']}\n  url:    {doc.get('url')}\n  chars:  {len(doc['text'])}"
               f"\n  metadata: {json.dumps(meta, ensure_ascii=False)[:300]}\n  text: {preview}…")
