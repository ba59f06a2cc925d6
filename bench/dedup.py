"""MinHash near-dedup: sourcelm vs datatrove on the same documents, same parameters, same run.

Documents: the demo corpus's handbook and Python pages (text extracted once with resiliparse,
untimed) and its fortunes, split into --tasks contiguous tasks. Both sides use 5-word shingles,
14 bands × 8 rows, 64-bit xxhash, and keep one document per cluster.

  sourcelm   MinhashDedup.collect per task (signatures) + resolve (buckets + clusters + decisions)
  datatrove  MinhashDedupSignature per rank + MinhashDedupBuckets per bucket + MinhashDedupCluster
             (its three stages called directly, in this process: no executor overhead is counted)

Both run in one process, one after the other (sourcelm with workers=1 for the ratio, then again with
--workers to show the band-parallel stage). Accuracy: each handbook page of a non-English locale
against its en-US original, with exact 5-word-shingle Jaccard (sourcelm's word normalisation) as
ground truth; a pair is "found" when the translated page was dropped; precision and recall at 0.75.

datatrove 0.10's xxhash helper passes str to xxhash, which xxhash 4 refuses; the benchmark wraps it
to encode UTF-8 first (one `str.encode` per shingle, what xxhash 3 did internally).

    .venv/bin/python bench/dedup.py [--corpus DIR] [--tasks 4] [--workers 2] [--max-fortunes N]
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, Python puts bench/ first on the path, where bench/tokenize.py would shadow the
# standard library's tokenize module: put the repository root there instead
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import itertools
import json
import struct
import tempfile
import time

import numpy as np

from sourcelm.data.corpus import demo as corpus
from sourcelm.data.dedup.minhash import MinhashDedup, MinhashParams, words
from sourcelm.data.pipeline.document import Document


def warc_pages(path: Path) -> list[tuple[str, str]]:
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.html import HTMLTree
    from warcio.archiveiterator import ArchiveIterator

    out = []
    with open(path, "rb") as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type == "response" and rec.http_headers.get_statuscode() == "200":
                url = rec.rec_headers.get_header("WARC-Target-URI")
                html = rec.content_stream().read().decode("utf-8", errors="replace")
                out.append((url.split("/", 3)[3], extract_plain_text(HTMLTree.parse(html), main_content=True)))
    return out


def load_documents(root: Path, max_fortunes: int | None) -> list[Document]:
    docs = []
    for warc in sorted((root / "warc").glob("*.warc.gz"), key=lambda p: (p.name != "handbook-en-US.warc.gz", p.name)):
        docs += [Document(id=path, text=text, source=warc.name) for path, text in warc_pages(warc)]
    for jsonl in sorted((root / "fortunes").glob("*.jsonl")):
        with open(jsonl, encoding="utf-8") as f:
            for i, line in enumerate(itertools.islice(f, max_fortunes)):
                docs.append(Document(id=f"{jsonl.stem}/{i}", text=json.loads(line)["text"], source=jsonl.name))
    return docs


def split(docs: list, tasks: int) -> list[list]:
    bounds = np.linspace(0, len(docs), tasks + 1).astype(int)
    return [docs[a:b] for a, b in itertools.pairwise(bounds)]


def run_sourcelm(parts: list[list[Document]], work: Path, workers: int) -> tuple[dict, set[str]]:
    step = MinhashDedup()
    t0 = time.perf_counter()
    for task, part in enumerate(parts):
        step.collect(iter(part), work, task)
    t1 = time.perf_counter()
    step.resolve(work, len(parts), workers)
    t2 = time.perf_counter()
    dropped = set()
    for task in range(len(parts)):
        dropped |= set(json.loads((work / f"drop_{task:05d}.json").read_text()))
    return {"signatures": t1 - t0, "buckets+clusters": t2 - t1, "total": t2 - t0}, dropped


def whitespace_tokenizer():
    """A datatrove WordTokenizer that splits on whitespace: isolates datatrove's hashing and
    bucketing from its default spaCy word tokenizer."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return text.splitlines()

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            raise NotImplementedError("not used by MinHash")

    return Whitespace("en")


def run_datatrove(parts: list[list[Document]], work: Path, tokenizer=None) -> tuple[dict, set[str]]:
    import xxhash
    from datatrove.data import Document as DtDocument
    from datatrove.pipeline.dedup import minhash as dt
    from datatrove.utils.hashes import xxhash as dt_xxhash
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.typeshelper import Languages

    dt_xxhash.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
    config = dt.MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8,
                              hash_config=HashConfig(precision=64, hash_fc="xxhash"))
    t0 = time.perf_counter()
    signer = dt.MinhashDedupSignature(str(work / "sigs"), config=config, language=tokenizer or Languages.english)
    for rank, part in enumerate(parts):
        signer.run(iter(DtDocument(text=d.text, id=d.id) for d in part), rank=rank, world_size=len(parts))
    t1 = time.perf_counter()
    buckets = dt.MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)
    for bucket in range(config.num_buckets):
        buckets.run(rank=bucket, world_size=config.num_buckets)
    t2 = time.perf_counter()
    dt.MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config).run()
    t3 = time.perf_counter()
    dropped = set()
    for rank, part in enumerate(parts):
        path = work / "remove" / f"{rank:06d}.remove"
        if path.exists():
            data = path.read_bytes()
            dropped |= {part[i].id for i in struct.unpack(f"<{len(data) // 4}I", data)}
    return {"signatures": t1 - t0, "buckets": t2 - t1, "clusters": t3 - t2, "total": t3 - t0}, dropped


def planted_signatures(n: int, seed: int = 0) -> np.ndarray:
    """(n, 112) random signatures below 2^61 - 1 (datatrove's reader stops at that value), where
    every tenth document copies an earlier one in half of its bands: a known duplicate structure."""
    rng = np.random.default_rng(seed)
    sig = rng.integers(0, (1 << 61) - 1, size=(n, 14 * 8), dtype=np.uint64)
    dups = np.arange(10, n, 10)
    src = rng.integers(0, dups)  # an earlier document
    for b in range(0, 14, 2):
        sig[dups, b * 8:(b + 1) * 8] = sig[src, b * 8:(b + 1) * 8]
    return sig


def cluster_stage_at_scale(n: int, tasks: int, workers: int, work: Path) -> None:
    """The stage every anchor stalls on, alone: the same precomputed signatures for n documents
    go to sourcelm's resolve and to datatrove's buckets + cluster stages (signature time excluded)."""
    from datatrove.pipeline.dedup import minhash as dt

    sig = planted_signatures(n)
    parts = np.array_split(np.arange(n), tasks)
    ours = MinhashDedup()
    ours_dir = work / "ours"
    ours_dir.mkdir(parents=True)
    params = {"ngram": 5, "bands": 14, "rows": 8, "hash_bits": 64, "seed": 1}
    for t, idx in enumerate(parts):
        np.save(ours_dir / f"sig_{t:05d}.npy", np.ascontiguousarray(sig[idx].reshape(-1, 14, 8).transpose(1, 0, 2)))
        (ours_dir / f"ids_{t:05d}.json").write_text(json.dumps(
            {"ids": [str(i) for i in idx.tolist()], "empty": [], "params": params}))
    record = np.dtype([(f"h{i}", "<u8") for i in range(8)] + [("doc", "<u4")])
    for b in range(14):
        (work / "dt_sigs" / f"bucket_{b:03d}").mkdir(parents=True)
        for t, idx in enumerate(parts):
            rec = np.empty(idx.size, dtype=record)
            for i in range(8):
                rec[f"h{i}"] = sig[idx, b * 8 + i]
            rec["doc"] = np.arange(idx.size)
            rec.sort(order=record.names)
            rec.tofile(work / "dt_sigs" / f"bucket_{b:03d}" / f"{t:05d}.minhash.sig")
    timings = {}
    for w in sorted({1, workers}):
        t0 = time.perf_counter()
        ours.resolve(ours_dir, tasks, w)
        timings[f"sourcelm resolve, workers={w}"] = time.perf_counter() - t0
    dropped_ours = json.loads((ours_dir / "minhash_stats.json").read_text())["near_duplicates"]
    config = dt.MinhashConfig()
    t0 = time.perf_counter()
    buckets = dt.MinhashDedupBuckets(str(work / "dt_sigs"), str(work / "dt_buckets"), config=config)
    for b in range(14):
        buckets.run(rank=b, world_size=14)
    t1 = time.perf_counter()
    dt.MinhashDedupCluster(str(work / "dt_buckets"), str(work / "dt_remove"), config=config).run()
    t2 = time.perf_counter()
    dropped_dt = sum((work / "dt_remove" / f"{t:06d}.remove").stat().st_size // 4 for t in range(tasks)
                     if (work / "dt_remove" / f"{t:06d}.remove").exists())
    timings["datatrove buckets + cluster"] = t2 - t0
    print(f"\ncluster stage alone, {n:,} documents in {tasks} tasks, {n // 10 - (n % 10 == 0):,} planted duplicates:")
    print("| run | seconds | docs/s |\n|---|---|---|")
    for name, secs in timings.items():
        print(f"| {name} | {secs:.2f} | {n / secs:,.0f} |")
    print(f"(datatrove: buckets {t1 - t0:.2f} s, cluster {t2 - t1:.2f} s)")
    print(f"speed-up (datatrove / sourcelm workers=1): "
          f"{timings['datatrove buckets + cluster'] / timings['sourcelm resolve, workers=1']:.1f}x; "
          f"dropped: sourcelm {dropped_ours:,}, datatrove {dropped_dt:,}")


def shingles(text: str) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + 5]) for i in range(len(w) - 4)}


def handbook_accuracy(docs: list[Document], dropped: set[str]) -> dict:
    """Precision/recall at 0.75 on (translated page, en-US page) pairs, exact Jaccard as truth."""
    en = {d.id.rsplit("/", 1)[1]: shingles(d.text) for d in docs if d.id.startswith("debian-handbook/en-US/")}
    truth, found = [], []
    for d in docs:
        if d.id.startswith("debian-handbook/") and "/en-US/" not in d.id and d.id.rsplit("/", 1)[1] in en:
            s, e = shingles(d.text), en[d.id.rsplit("/", 1)[1]]
            truth.append(len(s & e) / max(1, len(s | e)))
            found.append(d.id in dropped)
    truth, found = np.array(truth), np.array(found)
    pos = truth >= 0.75
    return {"pairs": int(truth.size), "true_near_dups": int(pos.sum()),
            "recall": float(found[pos].mean()) if pos.any() else float("nan"),
            "precision": float(pos[found].mean()) if found.any() else float("nan"),
            "theory_recall": float(MinhashParams().candidate_probability(truth[pos]).mean())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=corpus.cache_dir(), help="a fetched demo corpus")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-fortunes", type=int, default=None, help="at most this many quotes per fortunes file")
    ap.add_argument("--scale", type=int, default=0,
                    help="instead: the cluster stage alone on this many documents with planted duplicates")
    args = ap.parse_args()
    if args.scale:
        with tempfile.TemporaryDirectory() as tmp:
            cluster_stage_at_scale(args.scale, args.tasks, args.workers, Path(tmp))
        return 0
    if not (args.corpus / "manifest.json").exists():
        print(f"no corpus in {args.corpus}: run `sourcelm corpus fetch --dir {args.corpus}` first")
        return 2
    t = time.perf_counter()
    docs = load_documents(args.corpus, args.max_fortunes)
    n_words = sum(len(words(d.text)) for d in docs)
    print(f"{len(docs)} documents, {n_words / 1e6:.2f} M words, {sum(len(d.text) for d in docs) / 1e6:.1f} M chars "
          f"(loaded and extracted in {time.perf_counter() - t:.1f} s, untimed)")
    parts = split(docs, args.tasks)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ours, ours_drop = run_sourcelm(parts, tmp / "ours1", workers=1)
        ours_w, ours_w_drop = run_sourcelm(parts, tmp / "oursw", workers=args.workers)
        theirs, theirs_drop = run_datatrove(parts, tmp / "datatrove")
        theirs_ws, _ = run_datatrove(parts, tmp / "datatrove_ws", whitespace_tokenizer())
    assert ours_drop == ours_w_drop, "worker count changed the decisions"
    rows = [("sourcelm, workers=1", ours), (f"sourcelm, workers={args.workers}", ours_w),
            ("datatrove (default: spaCy words)", theirs), ("datatrove (whitespace words)", theirs_ws)]
    print("\n| run | signatures s | buckets+clusters s | total s | docs/s |\n|---|---|---|---|---|")
    for name, r in rows:
        bc = r.get("buckets+clusters", r.get("buckets", 0) + r.get("clusters", 0))
        print(f"| {name} | {r['signatures']:.2f} | {bc:.2f} | {r['total']:.2f} | {len(docs) / r['total']:,.0f} |")
    print(f"\nspeed-up, total (datatrove / sourcelm workers=1): {theirs['total'] / ours['total']:.1f}x; "
          f"signatures {theirs['signatures'] / ours['signatures']:.1f}x; buckets+clusters "
          f"{(theirs['buckets'] + theirs['clusters']) / ours['buckets+clusters']:.1f}x")
    print(f"speed-up, total (datatrove with whitespace words / sourcelm workers=1): "
          f"{theirs_ws['total'] / ours['total']:.1f}x")
    both = ours_drop & theirs_drop
    print(f"dropped: sourcelm {len(ours_drop)}, datatrove {len(theirs_drop)}, both {len(both)} "
          f"(Jaccard of the dropped sets {len(both) / max(1, len(ours_drop | theirs_drop)):.3f})")
    print("\n| system | handbook pairs | true near-dups (J >= 0.75) | recall | precision |\n|---|---|---|---|---|")
    for name, dropped in [("sourcelm", ours_drop), ("datatrove", theirs_drop)]:
        acc = handbook_accuracy(docs, dropped)
        print(f"| {name} | {acc['pairs']} | {acc['true_near_dups']} | {acc['recall']:.3f} | {acc['precision']:.3f} |")
    print(f"(S-curve theory for these pairs: recall {acc['theory_recall']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
