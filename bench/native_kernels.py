"""The native CPU kernels (`sourcelm.kernels`) against the same steps in torch, eager and compiled.

Three implementations of each contract run alternately in one process, median of --repeat calls after
warm-up, on the tiny preset's shapes:
  loss chunk   256 rows × V = 8192 logits, labels with every 7th ignored: the summed cross-entropy and
               softmax - one-hot written into a buffer (`sourcelm.kernels.reference.chunk_loss_and_grad`)
  rms_norm     forward + backward of an RMSNorm over [2048, 256] (the residual stream of 8 × 256 tokens)
               and [2048, 96] (MLA's q latent), fp32 weight (`sourcelm.model.norm_rope.RMSNorm`)
  moe rows     forward + backward of the routed experts' dispatch and combine (2048 tokens, top-4 of 16
               experts, H 256, bf16 rows from fp32 tokens; `sourcelm.kernels.moe_rows`); the torch
               code is not compiled (it is autograd Functions around gathers), so that column is empty
  rope         forward + backward of MLA's rotary slice of the queries, [8, 4 heads, 256, 16] strided
               (`sourcelm.model.norm_rope.apply_rope`)
  swiglu       forward + backward of silu(gate) * up on the fused gate/up output of a routed-expert layer
               (16 experts × 576 rows × 2 × 128) and of the dense FFN (2048 × 2 × 768), bf16
               (`ops.swiglu`)
  routing      the router's grouped top-4 of 16 experts for 2048 tokens (`moe.Router`'s selection) and the
               grouped layout's counting sort of the 8192 slots (`ops.group_by_expert`)
  AMX (CPUs with AMX only, `sourcelm.kernels.amx`):
  grouped mm   forward + backward of the routed experts' gate/up and down projections over 16 uneven groups
               (sizes as routing makes them, padded to 64 rows), bf16; torch's is `torch._grouped_mm`
               (one oneDNN matmul per group), which inductor does not compile into anything else
  attention    forward + backward of causal attention [8, 4 heads, 256, 48 / 32], bf16; torch's is the
               bmm path it replaces (`attention.bmm_causal`)
  torch        the torch code (the reference; what runs off the CPU)
  compiled     torch.compile of it (inductor's fused C++ kernels; what `train.compile = true` uses)
  native       the C kernel (the default on the CPU)

    .venv/bin/python bench/native_kernels.py [--threads 2 --repeat 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from unittest import mock

import torch

from sourcelm.config import load_config
from sourcelm.kernels import amx, build, cpu_fused, cpu_moe, ops, reference
from sourcelm.kernels.attention import bmm_causal
from sourcelm.kernels.reference import IGNORE, chunk_loss_and_grad, rms_norm, rotate_pairs
from sourcelm.model.moe import Router


def timed(fn, repeat: int) -> float:
    for _ in range(5):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def row(name: str, ms: dict) -> None:
    compiled = f"{ms['compiled']:9.2f}" if "compiled" in ms else f"{'-':>9s}"
    versus = f"{ms['compiled'] / ms['native']:15.1f}x" if "compiled" in ms else f"{'-':>16s}"
    print(f"{name:28s} {ms['torch']:8.2f} {compiled} {ms['native']:8.2f} {ms['torch'] / ms['native']:12.1f}x {versus}")


def moe_rows(g: torch.Generator, repeat: int) -> dict:
    """Dispatch + combine forward and backward with the native kernels and with the torch code."""
    n, k, e, h = 2048, 4, 16, 256
    x = torch.randn(n, h, generator=g).requires_grad_()
    weights = torch.rand(n, k, generator=g).requires_grad_()
    layout = ops.group_by_expert(torch.rand(n, e, generator=g).topk(k, -1).indices, e, align=64)
    up = torch.randn(n, h, generator=g).to(torch.bfloat16)

    def step():
        rows = ops.dispatch_rows(x, layout, torch.bfloat16)
        ops.combine_rows(rows * 0.5, weights, layout).backward(up)

    out = {"native": timed(step, repeat)}
    with mock.patch.dict(os.environ, {"SOURCELM_KERNELS": "torch"}):
        out["torch"] = timed(step, repeat)
    return out


def amx_rows(g: torch.Generator, repeat: int) -> None:
    """The AMX kernels against the torch code they replace (compiled where inductor changes anything)."""
    counts = torch.tensor([448, 512, 640, 384, 576, 512, 704, 448, 512, 320, 576, 640, 448, 512, 384, 576])
    offs = counts.cumsum(0).to(torch.int32)
    for n, k in ((256, 256), (256, 128)):
        x = torch.randn(int(counts.sum()), k, generator=g).to(torch.bfloat16).requires_grad_()
        w = torch.randn(16, n, k, generator=g).to(torch.bfloat16).requires_grad_()
        up = torch.randn(x.shape[0], n, generator=g).to(torch.bfloat16)
        steps = {"torch": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs),
                 "native": lambda: amx.grouped_linear(x, w, counts)}
        row(f"grouped mm fwd+bwd {x.shape[0]}x{k}->{n}",
            {name: timed(lambda f=f: torch.autograd.grad(f(), (x, w), up), repeat) for name, f in steps.items()})
    q, k = (torch.randn(8, 4, 256, 48, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(2))
    v = torch.randn(8, 4, 256, 32, generator=g).to(torch.bfloat16).requires_grad_()
    up = torch.randn(8, 4, 256, 32, generator=g).to(torch.bfloat16)
    scale = 48 ** -0.5
    attentions = {"torch": bmm_causal, "compiled": torch.compile(bmm_causal), "native": amx.causal_attention}
    row("attention fwd+bwd 8x4x256 bf16",
        {name: timed(lambda f=f: torch.autograd.grad(f(q, k, v, scale), (q, k, v), up), repeat)
         for name, f in attentions.items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not build.available():
        raise SystemExit("the native kernels did not build (see the log); nothing to compare")
    g = torch.Generator().manual_seed(0)
    print(f"{args.threads} threads, median of {args.repeat} calls (ms)")
    print(f"{'step':28s} {'torch':>8s} {'compiled':>9s} {'native':>8s} {'torch/native':>13s} {'compiled/native':>16s}")

    steps = {"torch": chunk_loss_and_grad, "compiled": torch.compile(chunk_loss_and_grad),
             "native": cpu_fused.chunk_loss_and_grad}
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(256, 8192, generator=g) * 4).to(dtype)
        labels = torch.randint(0, 8192, (256,), generator=g)
        labels[::7] = IGNORE
        grad = torch.empty_like(logits)
        row(f"loss chunk 256x8192 {str(dtype)[6:]}",
            {k: timed(lambda f=f: f(logits, labels, grad), args.repeat) for k, f in steps.items()})

    norms = {"torch": rms_norm, "compiled": torch.compile(rms_norm), "native": cpu_fused.rms_norm}
    for dim in (256, 96):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2048, dim, generator=g).to(dtype).requires_grad_()
            weight = (1 + 0.1 * torch.randn(dim, generator=g)).requires_grad_()
            dy = torch.randn(2048, dim, generator=g)
            row(f"rms_norm fwd+bwd 2048x{dim} {str(dtype)[6:]}",
                {k: timed(lambda f=f: f(x, weight, 1e-6).backward(dy), args.repeat) for k, f in norms.items()})

    row("moe rows fwd+bwd 2048x4x256", moe_rows(g, args.repeat))

    cos, sin = torch.randn(256, 8, generator=g), torch.randn(256, 8, generator=g)
    q = torch.randn(8, 256, 4, 48, generator=g).to(torch.bfloat16).transpose(1, 2)[..., 32:].requires_grad_()
    up = torch.randn(8, 4, 256, 16, generator=g).to(torch.bfloat16)
    ropes = {"torch": rotate_pairs, "compiled": torch.compile(rotate_pairs), "native": cpu_fused.rope}
    row("rope fwd+bwd 8x4x256x16 bf16", {k: timed(lambda f=f: f(q, cos, sin).backward(up), args.repeat)
                                          for k, f in ropes.items()})

    swiglus = {"torch": reference.swiglu, "compiled": torch.compile(reference.swiglu), "native": cpu_fused.swiglu}
    for shape in ((16, 576, 256), (2048, 1536)):
        gu = torch.randn(shape, generator=g).to(torch.bfloat16).requires_grad_()
        dh = torch.randn(*shape[:-1], shape[-1] // 2, generator=g).to(torch.bfloat16)
        row(f"swiglu fwd+bwd {'x'.join(map(str, shape))} bf16",
            {k: timed(lambda f=f: torch.autograd.grad(f(gu), gu, dh), args.repeat) for k, f in swiglus.items()})

    router = Router(load_config("tiny").model)
    scores = torch.rand(2048, 16, generator=g)
    select = lambda s: reference.route_topk(s, router.e_score_correction_bias, 4, 2, 2, 4)  # noqa: E731
    selects = {"torch": select, "compiled": torch.compile(select),
               "native": lambda s: cpu_moe.route_topk(s, router.e_score_correction_bias, 4, 2, 2, 4)}
    row("router top-4 of 16, 2048", {k: timed(lambda f=f: f(scores), args.repeat) for k, f in selects.items()})
    ids = cpu_moe.route_topk(scores, router.e_score_correction_bias, 4, 2, 2, 4)
    with mock.patch.dict(os.environ, {"SOURCELM_KERNELS": "torch"}):
        torch_layout = timed(lambda: ops.group_by_expert(ids, 16, 64), args.repeat)
    row("layout 8192 slots, 16 experts",
        {"torch": torch_layout, "native": timed(lambda: ops.group_by_expert(ids, 16, 64), args.repeat)})
    if amx.ready():
        amx_rows(g, args.repeat)
    else:
        print("(no AMX on this CPU: the grouped matmul and attention kernels do not run here)")


if __name__ == "__main__":
    main()
