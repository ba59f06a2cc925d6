"""The fused loss's per-chunk step: the native CPU kernel vs the same step in torch, eager and compiled.

One chunk of the tiny preset's head (256 rows × V = 8192 logits, labels with every 7th ignored): the
summed cross-entropy and the gradient softmax - one-hot written into a buffer. Three implementations
of the same contract run alternately in one process, median of --repeat calls each after warm-up:
  torch      `sourcelm.model.loss.chunk_loss_and_grad` (the reference code)
  compiled   torch.compile of it (inductor's fused C++ kernel; what `train.compile = true` used on CPU)
  native     `sourcelm.model.native_loss` (the default on the CPU)

    .venv/bin/python bench/loss_kernel.py [--rows 256 --vocab 8192 --threads 2 --repeat 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sourcelm.model.loss import IGNORE, chunk_loss_and_grad
from sourcelm.model.native_loss import kernel


def timed(fn, repeat: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native = kernel()
    if native is None:
        raise SystemExit("the native kernel did not build (see the log); nothing to compare")
    compiled = torch.compile(chunk_loss_and_grad)
    g = torch.Generator().manual_seed(0)
    print(f"chunk {args.rows} x {args.vocab}, {args.threads} threads, median of {args.repeat} (ms)")
    print(f"{'dtype':10s} {'torch':>8s} {'compiled':>9s} {'native':>8s} {'torch/native':>13s} {'compiled/native':>16s}")
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(args.rows, args.vocab, generator=g) * 4).to(dtype)
        labels = torch.randint(0, args.vocab, (args.rows,), generator=g)
        labels[::7] = IGNORE
        grad = torch.empty_like(logits)
        ms = {name: timed(lambda f=f: f(logits, labels, grad), args.repeat)
              for name, f in (("torch", chunk_loss_and_grad), ("compiled", compiled), ("native", native))}
        print(f"{str(dtype).split('.')[1]:10s} {ms['torch']:8.2f} {ms['compiled']:9.2f} {ms['native']:8.2f} "
              f"{ms['torch'] / ms['native']:12.1f}x {ms['compiled'] / ms['native']:15.1f}x")


if __name__ == "__main__":
    main()
