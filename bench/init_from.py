"""Continued pretraining of an exported model (issue 20 §2): validation loss before / after, peak RSS per rank.

    .venv/bin/python bench/init_from.py --tokens runs/x/tokens --out runs/init_from_bench

1. trains a base model (the `tiny` preset, one process) on the token shards and exports it (`sourcelm export`);
2. continues it for 50 steps with `sourcelm train configs/continue.toml --init-from HF --nproc 4 parallel.ep=4`
   (2 pretend nodes × 2), the LR set to the base's final LR;
3. prints the base's validation loss (measured at step 0 by the continued run), the loss after 50 steps, and each
   rank's load: bytes read, its part of the model, peak RSS during the load, against the checkpoint's full size.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

BASE_STEPS = 40


def sourcelm(*args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sourcelm", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", required=True, help="a `sourcelm tokenize` output (train/ and valid/)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tokens, out = Path(args.tokens), Path(args.out)
    data = [f"data.train=['{tokens / 'train'}']", f"data.valid=['{tokens / 'valid'}']", "logging.progress=false",
            "logging.tensorboard=false", "logging.valid_batches=4"]
    vocab = json.loads((tokens / "manifest.json").read_text()).get("vocab_size")
    model = [f"model.vocab_size={vocab}"] if vocab else []
    base_time = sourcelm("train", "tiny", *data, *model, f"schedule.steps={BASE_STEPS}", "checkpoint.every=1000",
                         "logging.valid_every=1000", "--run-dir", str(out / "base"), "--no-resume")
    ckpt = out / "base" / "checkpoints" / f"step_{BASE_STEPS:06d}"
    sourcelm("export", str(ckpt), "--hf", str(out / "hf"))
    cont = out / "continued"
    cont_time = sourcelm("train", "configs/continue.toml", "--init-from", str(out / "hf"), *data,
                         "optim.lr=3e-4", "optim.min_lr=3e-5", "schedule.steps=50", "schedule.warmup_steps=5",
                         "schedule.micro_batch=2", "parallel.ep=4", "logging.valid_every=50", "checkpoint.every=50",
                         "--nproc", "4", "--ranks-per-node", "2", "--run-dir", str(cont), "--no-resume")
    records = [json.loads(line) for line in (cont / "metrics.jsonl").read_text().splitlines()]
    before = next(r["valid_loss"] for r in records if r.get("kind") == "base")
    after = next(r["valid_loss"] for r in records if r.get("step") == 50 and r.get("valid_loss") is not None)
    print(f"base: tiny, {BASE_STEPS} steps ({base_time:.0f} s); continued: 50 steps at EP 4 ({cont_time:.0f} s)")
    print(f"validation loss: base {before:.4f} -> after 50 continued steps {after:.4f}")
    pattern = re.compile(r"rank (\d+): read ([\d.]+) MB of the ([\d.]+) MB checkpoint .* into its ([\d.]+) MB of the "
                         r"model; peak RSS (\d+) MB \((\d+) MB before loading\)")
    print("| rank | read (MB) | its part of the model (MB) | checkpoint (MB) | RSS before load (MB) | peak RSS (MB) |"
          " growth (MB) |")
    print("|---|---|---|---|---|---|---|")
    for log in sorted(cont.glob("train*.log")):
        for m in pattern.finditer(log.read_text()):
            rank, read, full, part, peak, pre = m.groups()
            print(f"| {rank} | {read} | {part} | {full} | {pre} | {peak} | {int(peak) - int(pre)} |")


if __name__ == "__main__":
    main()
