"""`sourcelm tokenize`: curated documents -> Megatron token shards, split into train and valid.

One task per input file `documents/NAME.jsonl.zst`. A task encodes its documents in batches
(`encode_batch`), appends <|end_of_text|> to each, and sends each document to `train/NAME` or
`valid/NAME` by a hash of its id. Beside each shard, `NAME.sources.json` names every document's
source (mixtures by source read it). A finished task leaves `tasks/NAME.json` (its counts), so a
rerun skips it; a task's shards appear under their final names only when complete.

Executors: "local" (one process per worker; each worker encodes single-threaded so N workers use N
cores) and "ray" (the same task function as Ray tasks, on a local Ray started with
num_cpus=workers unless an address is given). The shards do not depend on the executor or the
number of workers: each is a pure function of its input file, the tokenizer and the split fraction.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from pathlib import Path

from sourcelm.artifacts import atomic_write_bytes, sha256_file, write_manifest
from sourcelm.tokens.documents import DocumentInput
from sourcelm.tokens.indexed import ShardWriter, dtype_for_vocab
from sourcelm.tokens.stream import SOURCES_SUFFIX, in_valid_split, write_doc_sources
from sourcelm.tokens.tokenizer import EOS, load_tokenizer

log = logging.getLogger(__name__)
SPLITS = ("train", "valid")
_SINGLE_THREAD_ENV = {"RAYON_RS_NUM_CPUS": "1", "RAYON_NUM_THREADS": "1"}
_TOKENIZERS: dict[str, object] = {}  # per-process cache: a worker loads the tokenizer once


def _tokenizer(path: str):
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = load_tokenizer(path)
    return _TOKENIZERS[path]


def run_task(source: DocumentInput, input_file: str, output: str, tokenizer_dir: str, tokenizer_sha: str,
             valid_fraction: float, batch_size: int = 1000) -> dict:
    """Tokenizes one input unit (a file, or a folder of text files) into its train/valid shards; returns (and
    records) its counts."""
    tok = _tokenizer(tokenizer_dir)
    eos = tok.token_to_id(EOS)
    dtype = dtype_for_vocab(tok.get_vocab_size(with_added_tokens=True))
    name, out = source.task_name(Path(input_file)), Path(output)
    writers: dict[str, ShardWriter] = {}
    sources: dict[str, list[str]] = defaultdict(list)
    counts = {s: defaultdict(lambda: [0, 0]) for s in SPLITS}  # split -> source -> [docs, tokens]
    skipped: Counter = Counter()
    skip_log: list[dict] = []

    def flush(batch: list[dict]) -> None:
        for doc, enc in zip(batch, tok.encode_batch([d["text"] for d in batch], add_special_tokens=False)):
            ids = enc.ids
            ids.append(eos)
            split = "valid" if in_valid_split(doc["id"].encode(), valid_fraction) else "train"
            if split not in writers:
                writers[split] = ShardWriter(out / split / name, dtype)
            writers[split].add_document(ids)
            source = doc.get("source") or ""
            sources[split].append(source)
            c = counts[split][source]
            c[0] += 1
            c[1] += len(ids)

    for split in SPLITS:  # outputs of an earlier run of this task with other settings
        for ext in (".bin", ".idx", SOURCES_SUFFIX):
            (out / split / f"{name}{ext}").unlink(missing_ok=True)
    try:
        batch: list[dict] = []
        for doc in source.documents(Path(input_file), skipped, skip_log):
            batch.append(doc)
            if len(batch) >= batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
        for split, w in writers.items():
            w.finalize()
            write_doc_sources(out / split / name, sources[split])
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    record = {
        "input": source.label(Path(input_file)), "input_sha256": source.unit_sha256(Path(input_file)),
        "tokenizer_sha256": tokenizer_sha,
        "valid_fraction": valid_fraction, "dtype": str(dtype), "skipped": dict(skipped),
        "splits": {s: {"documents": sum(v[0] for v in counts[s].values()),
                       "tokens": sum(v[1] for v in counts[s].values()),
                       "sources": {k: {"documents": v[0], "tokens": v[1]} for k, v in sorted(counts[s].items())}}
                   for s in writers},
    }
    tasks = out / "tasks"
    if skip_log:
        atomic_write_bytes(tasks / f"{name}.skipped.jsonl",
                           "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skip_log).encode())
    atomic_write_bytes(tasks / f"{name}.json", (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
    return record


def _is_done(out: Path, name: str, tokenizer_sha: str, valid_fraction: float) -> bool:
    marker = out / "tasks" / f"{name}.json"
    if not marker.exists():
        return False
    rec = json.loads(marker.read_text())
    if rec.get("tokenizer_sha256") != tokenizer_sha or rec.get("valid_fraction") != valid_fraction:
        return False
    return all((out / s / f"{name}{ext}").exists() for s in rec["splits"] for ext in (".bin", ".idx", SOURCES_SUFFIX))


def _init_single_threaded() -> None:
    os.environ.update(_SINGLE_THREAD_ENV)  # before the worker's first encode builds its thread pool


def _run_local(jobs: list[tuple], workers: int, on_done) -> None:
    if workers <= 1:
        for job in jobs:
            on_done(run_task(*job))
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no inherited tokenizer thread pool
    with ctx.Pool(workers, initializer=_init_single_threaded) as pool:
        for rec in pool.imap_unordered(_run_task_star, jobs):
            on_done(rec)


def _run_task_star(job: tuple) -> dict:
    return run_task(*job)


def _run_ray(jobs: list[tuple], workers: int, address: str | None, on_done) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, runtime_env={"env_vars": _SINGLE_THREAD_ENV})
        else:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": _SINGLE_THREAD_ENV})
    try:
        remote = ray.remote(num_cpus=1)(run_task)
        pending = [remote.remote(*job) for job in jobs]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            on_done(ray.get(ready[0]))
    finally:
        if started:
            ray.shutdown()


def tokenize(curated_dir: str | Path, tokenizer_dir: str | Path, output: str | Path, workers: int = 1,
             executor: str = "local", valid_fraction: float = 0.01, batch_size: int = 1000,
             ray_address: str | None = None, show_progress: bool = True, text_key: str = "text") -> dict:
    """Runs every unfinished task, then writes the manifests. Returns the top-level summary. `curated_dir`: or
    plain JSONL / Parquet / text (`DocumentInput`; `text_key` names plain records' text field)."""
    from sourcelm.tokens.progress import progress_bar

    if executor not in ("local", "ray"):
        raise ValueError(f"--executor must be 'local' or 'ray', got {executor!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    source = DocumentInput(Path(curated_dir), text_key)
    files = source.units()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(tokenizer_dir)
    load_tokenizer(tok_dir)  # fails early, naming the missing file
    tok_sha = sha256_file(tok_dir / "tokenizer.json")
    names = [source.task_name(f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError(f"{curated_dir}: two input files share a task name")
    jobs = [(source, str(f), str(out), str(tok_dir), tok_sha, valid_fraction, batch_size)
            for f, n in zip(files, names) if not _is_done(out, n, tok_sha, valid_fraction)]
    if len(jobs) < len(files):
        log.info("tokenize: %d of %d tasks already done, skipped", len(files) - len(jobs), len(files))
    with progress_bar(show_progress) as progress:
        bar = progress.add_task("tokenize", total=len(files), completed=len(files) - len(jobs), unit="files")
        tokens = progress.add_task("tokens", total=None, unit="tokens")

        def on_done(rec: dict) -> None:
            progress.advance(bar)
            progress.advance(tokens, sum(s["tokens"] for s in rec["splits"].values()))

        if executor == "ray":
            _run_ray(jobs, workers, ray_address, on_done)
        else:
            _run_local(jobs, workers, on_done)
    records = {n: json.loads((out / "tasks" / f"{n}.json").read_text()) for n in names}
    return write_manifests(out, source.provenance_inputs(files), tok_dir, tok_sha, valid_fraction, records)


def write_manifests(out: Path, read: list[Path], tok_dir: Path, tok_sha: str, valid_fraction: float,
                    records: dict[str, dict]) -> dict:
    """One manifest per split dir (its shards, with per-shard and per-source counts) and one at the
    top linking both, the skip logs and the inputs."""
    tok = load_tokenizer(tok_dir)
    dtype = dtype_for_vocab(tok.get_vocab_size(with_added_tokens=True))
    inputs = [*read, tok_dir / "manifest.json" if (tok_dir / "manifest.json").exists()
              else tok_dir / "tokenizer.json"]
    common = {"tokenizer_sha256": tok_sha, "dtype": str(dtype), "vocab_size": tok.get_vocab_size(),
              "eos_token_id": tok.token_to_id(EOS), "eos_appended": True}
    summary: dict = {"splits": {}, "skipped": Counter()}
    outputs = []
    for split in SPLITS:
        shards = {n: r["splits"][split] for n, r in sorted(records.items()) if split in r["splits"]}
        if not shards:
            (out / split / "manifest.json").unlink(missing_ok=True)  # left by a run with other settings
            continue
        per_source: dict = defaultdict(lambda: {"documents": 0, "tokens": 0})
        for s in shards.values():
            for src, c in s["sources"].items():
                per_source[src]["documents"] += c["documents"]
                per_source[src]["tokens"] += c["tokens"]
        totals = {"documents": sum(s["documents"] for s in shards.values()),
                  "tokens": sum(s["tokens"] for s in shards.values()), "sources": dict(sorted(per_source.items()))}
        files = [f"{n}{ext}" for n in shards for ext in (".bin", ".idx", SOURCES_SUFFIX)]
        write_manifest(out / split, "tokenize", outputs=files, inputs=inputs,
                       config={"split": split, "valid_fraction": valid_fraction},
                       extra={**common, **totals, "shards": shards})
        outputs.append(f"{split}/manifest.json")
        summary["splits"][split] = totals
    for r in records.values():
        summary["skipped"].update(r["skipped"])
    summary["skipped"] = dict(summary["skipped"])
    outputs += [str(p.relative_to(out)) for p in sorted((out / "tasks").glob("*"))]
    write_manifest(out, "tokenize", outputs=outputs, inputs=inputs,
                   config={"valid_fraction": valid_fraction},
                   extra={**common, **summary,
                          "input_files": {r["input"]: r["input_sha256"] for r in records.values()}})
    return summary
