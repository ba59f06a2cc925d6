"""The routed experts' grouped matmuls in torch: one `torch._grouped_mm` per projection over rows grouped by
expert, where this torch build runs it for the device and dtype (checked once, on a small problem, against
the per-expert loop), and the alignment the CPU wants for the groups; a batched matmul for equal groups and
the per-expert loop (`reference.grouped_linear_loop`). `ops.expert_ffn` chooses between these and the AMX
kernel. Each takes a `sink` for the zero-bubble W split, so the experts' weight gradients wait for the W
whichever backend runs.
"""

from __future__ import annotations

import logging

import torch

from sourcelm.kernels import reference

log = logging.getLogger(__name__)

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}
# On CPU a bf16/fp16 grouped matmul runs one oneDNN matmul per group, and oneDNN JIT-compiles a kernel
# for every new row count. With routing nearly every group of every step is a new shape; padded to
# multiples of 64 rows, the few shapes stay in the primitive cache (11.7 against 1.3 ms for one projection,
# bench/RESULTS_train.md). fp32 does not JIT and is not padded.
CPU_LOW_PRECISION_ALIGN = 64


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward here, checked once per (device type, dtype)
    on a small problem against the plain loop; the choice is logged."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = False
        if hasattr(torch, "_grouped_mm"):
            try:
                g = torch.Generator().manual_seed(0)
                # uneven and empty groups, as real routing produces (some kernels need aligned groups)
                x = torch.randn(32, 16, generator=g).to(device, dtype).requires_grad_()
                w = torch.randn(3, 16, 16, generator=g).to(device, dtype).requires_grad_()
                offs = torch.tensor([5, 5, 32], dtype=torch.int32, device=device)
                y = torch._grouped_mm(x, w, offs=offs)
                ref = torch.cat([x[:5] @ w[0], x[5:] @ w[2]])
                y.backward(torch.ones_like(y))
                ok = bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2)) and w.grad is not None
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
        log.info("routed experts on %s/%s: %s", device.type, dtype,
                 "torch._grouped_mm" if ok else "loop over non-empty experts (grouped_mm unsupported here)")
    return _GROUPED_MM_OK[key]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (the grouped-matmul backward
    rejects expanded gradients such as the one `y.sum().backward()` produces)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _DeferredGroupedMM(torch.autograd.Function):
    """`torch._grouped_mm(x, w^T, offs)` whose backward returns x's gradient and files w's in `sink` (the zero-
    bubble W split): the grouped matmuls autograd runs for it (dx = g w per group, dw = g^T x per group)."""

    @staticmethod
    def forward(ctx, x, w, offs, sink):
        ctx.save_for_backward(x, w, offs)
        ctx.sink = sink
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, grad):
        x, w, offs = ctx.saved_tensors
        g = grad.contiguous()
        ctx.sink.file(lambda: torch._grouped_mm(g.t(), x, offs=offs))
        return torch._grouped_mm(g, w, offs=offs), None, None, None


def grouped_linear_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, sink=None) -> torch.Tensor:
    """Rows of x [N, in] grouped by expert (group ends `offs`, int32 [E]) times w[e]^T ([E, out, in]) -> [N, out].
    sink (`ops.WeightGradSink`, holding w): backward files w's gradient there instead of returning it."""
    if sink is not None:
        return _DeferredGroupedMM.apply(x, w.detach(), offs, sink)
    return torch._grouped_mm(_ContiguousGrad.apply(x), w.transpose(-2, -1), offs=offs)


class _DeferredBatchedLinear(torch.autograd.Function):
    """`torch.bmm(x, w^T)` ([G, n, in] by [G, out, in]) whose backward returns x's gradient and files w's in `sink`:
    the bmms autograd runs for it (dx = g w; dw = (x^T g)^T, the gradient of the transposed view), so the bits
    are the same."""

    @staticmethod
    def forward(ctx, x, w, sink):
        ctx.save_for_backward(x, w)
        ctx.sink = sink
        return torch.bmm(x, w.transpose(-2, -1))

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        ctx.sink.file(lambda: torch.bmm(x.transpose(-2, -1), grad).transpose(-2, -1))
        return torch.bmm(grad, w), None, None


def batched_linear(x: torch.Tensor, w: torch.Tensor, sink=None) -> torch.Tensor:
    """Equal groups of rows x [G, n, in] times their expert's w[g]^T ([G, out, in]) -> [G, n, out]. sink as in
    `grouped_linear_mm`."""
    if sink is not None:
        return _DeferredBatchedLinear.apply(x, w.detach(), sink)
    return torch.bmm(x, w.transpose(-2, -1))


class _DeferredLinearLoop(torch.autograd.Function):
    """`reference.grouped_linear_loop` whose backward returns x's gradient and files w's in `sink`: per expert the
    GEMMs autograd runs for F.linear (dx = g w[e], dw[e] = g^T x), an expert without rows gets zeros as autograd
    would give it, so the bits are the same."""

    @staticmethod
    def forward(ctx, x, w, sizes, sink):
        ctx.save_for_backward(x, w)
        ctx.sizes, ctx.sink = sizes, sink
        return reference.grouped_linear_loop(x, w, torch.tensor(sizes))

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        groups = list(zip(grad.split(ctx.sizes), x.split(ctx.sizes), w))
        ctx.sink.file(lambda: torch.stack([g.t().mm(rows) if len(rows) else torch.zeros_like(we)
                                           for g, rows, we in groups]))
        return torch.cat([g.mm(we) for g, rows, we in groups if len(rows)]), None, None, None


def grouped_linear_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, sink=None) -> torch.Tensor:
    """`reference.grouped_linear_loop` (one matmul per non-empty expert), sink as in `grouped_linear_mm`."""
    if sink is not None:
        return _DeferredLinearLoop.apply(x, w.detach(), counts.tolist(), sink)
    return reference.grouped_linear_loop(x, w, counts)
