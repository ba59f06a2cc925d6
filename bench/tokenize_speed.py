"""Tokenization throughput: sourcelm tokenize vs a plain `tokenizers` loop vs datatrove, per core.

The three run on the same curated documents with the same tokenizer, each in its own process with
the tokenizers thread pool pinned to one thread, alternating, `--repeats` times; the best run of
each is kept. Tokens/s per core = tokens / CPU seconds (user + system) of that process, so the
figure does not depend on how busy the other core is. Also checks that sourcelm's shards hold the
same token ids as datatrove's (both append <|end_of_text|> to each document).

    .venv/bin/python bench/tokenize_speed.py [--mb 16] [--repeats 2] [--vocab-size 8192]

The corpus is built from files already on the machine: the Python standard library's sources
(code) and the Markdown/reST/text files of the installed packages (prose).
"""

from __future__ import annotations

import sys
from pathlib import Path

# this file is named like the standard library's `tokenize`: keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import resource
import subprocess
import sysconfig
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("sourcelm", "tokenizers", "datatrove")


def build_corpus(out: Path, megabytes: float, files: int = 4) -> int:
    """Writes out/documents/*.jsonl.zst from local source and text files; returns the bytes of text."""
    import zstandard

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    code = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
    prose = sorted(p for ext in ("*.md", "*.rst", "*.txt") for p in site.rglob(ext))
    budget, total, docs = megabytes * 1e6, 0, []
    for a, b in zip(code, prose + prose):  # interleave code and prose until the budget is spent
        for path, source in ((a, "code"), (b, "text")):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                docs.append({"id": f"{source}:{path}", "text": text, "source": source, "url": None, "metadata": {}})
                total += len(text.encode())
        if total >= budget:
            break
    (out / "documents").mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // files)
    for f in range(files):
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[f * per: (f + 1) * per])
        (out / "documents" / f"{f:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    return total


def run_mode(mode: str, cur: Path, tok: Path, work: Path) -> dict:
    """Runs one competitor in this process; returns its token count."""
    if mode == "sourcelm":
        from sourcelm.tokens.tokenize import tokenize

        summary = tokenize(cur, tok, work, workers=1, valid_fraction=0.0, show_progress=False)
        return {"tokens": summary["splits"]["train"]["tokens"]}
    if mode == "tokenizers":
        import zstandard
        from tokenizers import Tokenizer

        t = Tokenizer.from_file(str(tok / "tokenizer.json"))
        n = 0
        for path in sorted((cur / "documents").glob("*.jsonl.zst")):
            with open(path, "rb") as raw:
                data = zstandard.ZstdDecompressor().stream_reader(raw).read()
            texts = [json.loads(line)["text"] for line in data.splitlines()]
            for i in range(0, len(texts), 1000):
                n += sum(len(e.ids) + 1 for e in t.encode_batch(texts[i: i + 1000], add_special_tokens=False))
        return {"tokens": n}
    if mode == "datatrove":
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.tokens import MegatronDocumentTokenizer

        from sourcelm.tokens.indexed import ShardReader, find_shards

        LocalPipelineExecutor(pipeline=[
            JsonlReader(str(cur / "documents"), glob_pattern="*.jsonl.zst", compression="zstd"),
            MegatronDocumentTokenizer(str(work / "out"), tokenizer_name_or_path=str(tok / "tokenizer.json"),
                                      eos_token="<|end_of_text|>", batch_size=1000),
        ], tasks=1, workers=1, logging_dir=str(work / "logs")).run()
        return {"tokens": sum(ShardReader(p).num_tokens for p in find_shards(work / "out"))}
    raise ValueError(mode)


def timed_child(mode: str, cur: Path, tok: Path, work: Path) -> dict:
    env = {**os.environ, "RAYON_RS_NUM_CPUS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "true"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--_child", mode, str(cur), str(tok), str(work)], check=False,
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{mode} failed:\n{out.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {**res, "wall_s": wall, "cpu_s": cpu, "tok_per_cpu_s": res["tokens"] / cpu}


def same_ids(sourcelm_dir: Path, datatrove_dir: Path) -> bool:
    import numpy as np

    from sourcelm.tokens.indexed import ShardReader, find_shards

    ours = np.concatenate([np.asarray(ShardReader(p).tokens) for p in find_shards(sourcelm_dir / "train")])
    theirs = np.concatenate([np.asarray(ShardReader(p).tokens) for p in find_shards(datatrove_dir / "out")])
    return ours.shape == theirs.shape and bool((ours.astype(np.int64) == theirs.astype(np.int64)).all())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=16, help="megabytes of text in the corpus")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--tokenizer", help="an existing tokenizer dir (default: train one on the corpus)")
    ap.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        mode, cur, tok, work = args._child
        print(json.dumps(run_mode(mode, Path(cur), Path(tok), Path(work))))
        return

    from sourcelm.tokens.tokenizer import train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="sourcelm-bench-tokenize-"))
    cur = tmp / "curated"
    nbytes = build_corpus(cur, args.mb)
    tok = Path(args.tokenizer) if args.tokenizer else tmp / "tokenizer"
    if not args.tokenizer:
        t0 = time.perf_counter()
        train_tokenizer(cur, args.vocab_size, tok, show_progress=False)
        print(f"tokenizer: trained vocab {args.vocab_size} on {nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
    best: dict[str, dict] = {}
    for r in range(args.repeats):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            work = tmp / f"{mode}-{r}"
            res = timed_child(mode, cur, tok, work)
            print(f"run {r} {mode:10s} {res['tokens']:>10,d} tokens  wall {res['wall_s']:6.2f}s  "
                  f"cpu {res['cpu_s']:6.2f}s  {res['tok_per_cpu_s']:>10,.0f} tok/s/core")
            if mode not in best or res["tok_per_cpu_s"] > best[mode]["tok_per_cpu_s"]:
                best[mode] = {**res, "work": work}
    print(f"\ncorpus: {nbytes / 1e6:.1f} MB of text, {best['sourcelm']['tokens']:,} tokens "
          f"({nbytes / best['sourcelm']['tokens']:.2f} bytes/token)")
    print("| | tokens/s per core | CPU s | wall s |\n|---|---:|---:|---:|")
    for mode in MODES:
        b = best[mode]
        print(f"| {mode} | {b['tok_per_cpu_s']:,.0f} | {b['cpu_s']:.2f} | {b['wall_s']:.2f} |")
    s = best["sourcelm"]["tok_per_cpu_s"]
    print(f"\nsourcelm / plain tokenizers loop: {s / best['tokenizers']['tok_per_cpu_s']:.2f}x")
    print(f"sourcelm / datatrove:             {s / best['datatrove']['tok_per_cpu_s']:.2f}x")
    print(f"token counts equal: {len({b['tokens'] for b in best.values()}) == 1}; "
          f"sourcelm shards == datatrove shards (ids): {same_ids(best['sourcelm']['work'], best['datatrove']['work'])}")


if __name__ == "__main__":
    main()
