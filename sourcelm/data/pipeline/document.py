"""The unit every curation step sees: one document with a stable id.

The id is a hash of where the record came from (the input file's identity and the record's
position in it), so rerunning the pipeline on the same inputs gives the same ids, and
`sourcelm audit ID` can follow a document through any run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import xxhash


def make_doc_id(source: str, position: int | str) -> str:
    """A stable 16-hex-digit id for the record at `position` of the input named `source`."""
    return xxhash.xxh3_64_hexdigest(f"{source}\x00{position}".encode())


@dataclass
class Document:
    id: str  # stable: hash of (source file identity, record position) so a rerun gives the same id
    text: str
    source: str  # e.g. the input file's relative path or a corpus name
    url: str | None = None
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "source": self.source, "url": self.url,
                "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict) -> Document:
        """Inverse of `to_dict`. Raises ValueError naming the field when `d` is malformed."""
        for key in ("id", "text", "source"):
            if not isinstance(d.get(key), str):
                raise ValueError(f"field {key!r} missing or not a string")
        url = d.get("url")
        if url is not None and not isinstance(url, str):
            raise ValueError("field 'url' is not a string")
        meta = d.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError("field 'metadata' is not an object")
        return cls(id=d["id"], text=d["text"], source=d["source"], url=url, metadata=meta)
