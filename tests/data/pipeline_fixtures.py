"""A small mixed input set (WARC + JSONL with bad lines) and a pipeline over it, for the
pipeline, executor and resume tests; plus a deliberately slow step for the SIGKILL test."""

from __future__ import annotations

import json
import time
from pathlib import Path

from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step
from tests.data.warc_fixtures import ENGLISH, page, write_warc

GERMAN = ("Der Fluss entspringt in den Hügeln nördlich der Stadt und fließt durch ein weites Tal nach Süden, "
          "wo die Bauern seit Jahrhunderten Weizen und Gerste anbauen. Im Frühling ist das Wasser hoch und schnell.")


def english_text(i: int) -> str:
    """A distinct English document of ~120 words that passes the quality filters."""
    order = [ENGLISH[(i + k) % 4] for k in range(4)]
    return f"Report number {i} from the valley. " + " ".join(order) + f" This was note {i * 7919 % 1000}."


def make_inputs(root: Path, n_jsonl_files: int = 3, docs_per_file: int = 12) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "warc").mkdir(exist_ok=True)
    pages = [(f"http://site.test/p{i}.html", "text/html", page(f"Page {i}", [english_text(100 + i)]))
             for i in range(6)]
    pages.append(("http://site.test/de.html", "text/html", page("Seite", [GERMAN])))
    pages.append(("http://pornhub.com/x.html", "text/html", page("x", [english_text(1)])))
    pages.append(("http://site.test/logo.png", "image/png", b"\x89PNG" + bytes(50)))
    write_warc(root / "warc" / "crawl.warc.gz", pages)
    (root / "jsonl").mkdir(exist_ok=True)
    for f in range(n_jsonl_files):
        lines = []
        for i in range(docs_per_file):
            k = f * docs_per_file + i
            text = english_text(k % 20)  # repeats across files: exact duplicates for the global step
            if i % 5 == 4:
                text = "Too short to keep."
            lines.append(json.dumps({"text": text, "url": f"http://j.test/{k}", "id": k}))
            if i == 3:
                lines.append('{"text": 12}')
                lines.append("{broken json")
        if f == 0:
            lines.append(json.dumps({"text": "Contact me at someone@example.org from 203.0.113.9. "
                                             + english_text(999)}))
        (root / "jsonl" / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return root


PIPELINE = """
name = "test"
[[input]]
paths = ["data/warc/*.warc.gz", "data/jsonl/*.jsonl"]
[tasks]
target_mb = 0.000001
[[step]]
type = "extract"
[[step]]
type = "url_filter"
[[step]]
type = "language"
languages = ["en"]
[[step]]
type = "gopher_quality"
[[step]]
type = "gopher_repetition"
[[step]]
type = "exact_dedup"
[[step]]
type = "pii"
"""


def write_pipeline(root: Path, text: str = PIPELINE, extra_steps: str = "") -> Path:
    path = root / "pipeline.toml"
    path.write_text(text + extra_steps)
    return path


class SlowStep(Step):
    """Sleeps per document, so a test can kill the run in the middle."""

    name = "slow"

    def __init__(self, seconds: float = 0.01):
        super().__init__()
        self.seconds = seconds

    def process(self, doc: Document) -> Document:
        time.sleep(self.seconds)
        return doc


def output_bytes(out: Path) -> dict[str, bytes]:
    """Every curated shard and drop log, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for d in ("documents", "drops")
            for p in sorted((out / d).rglob("*")) if p.is_file()}
