"""The routed experts' grouped matmuls in torch: one `torch._grouped_mm` per projection over rows grouped by
expert, where this torch build runs it for the device and dtype (checked once, on a small problem, against
the per-expert loop), and the alignment the CPU wants for the groups. `ops.expert_ffn` chooses between these,
the AMX kernel, a batched matmul for equal groups and the per-expert loop (`reference.grouped_linear_loop`).
"""

from __future__ import annotations

import logging

import torch

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
