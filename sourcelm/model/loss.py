"""Cross-entropy through the LM head without materialising the full logits (the training fast path).

`linear_cross_entropy(h, W, labels)` returns sum_i CE(h_i W^T, labels_i) over the labels != -100,
the same value as `F.cross_entropy(F.linear(h, W).float(), labels, reduction="sum")` (the plain
reference, kept in `transformer.py` and used whenever the caller asks for logits).

Why: with V = 8192 and 2048 tokens, the plain path writes the [N, V] logits, an fp32 copy of them,
their log-softmax, the gradient of each, and casts between them: about ten full passes over a 64 MB
tensor per head, and MTP runs the head twice. Here the rows are processed in chunks of `chunk_rows`
tokens; each chunk's logits live only while it is handled. Because the loss is a scalar, the
gradient is computed in the same pass (softmax - one-hot, then the two matmuls) and only scaled by
the incoming gradient in backward: no second pass over the head, no recomputation. The head's matmul
writes a chunk's logits straight into the buffer that keeps its gradient, where the per-chunk step
overwrites them: no fresh 8 MB block per chunk (on the CPU a new block is faulted in page by page,
measured 3.3 ms for the forward matmul against 1.2 ms into a reused buffer).

The head's weight gradient is not summed chunk by chunk: the softmax gradients of a row group (up to
16 MB, 1024 rows of the tiny preset) are kept, each group's gradient is one matmul with K = the group's
rows, and later groups are added by the matmul itself (`addmm_`). Per chunk it would be a [V, H]
product plus a mixed-precision accumulate (an fp32 copy of it, then the add): measured 2.2 ms per chunk
in the bf16 step, 18 ms of it.

Precision: the matmuls run in the autocast dtype when autocast is on (bf16 on CPU), as the plain
path would; log-sum-exp and the softmax are fp32; the head's gradient is rounded to the compute dtype
once per row group (once in all, like the plain path, when one group holds every row), each group's
product added to the previous groups' sum in the matmul's fp32 accumulator. Chunks are processed in a
fixed order, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sourcelm.kernels import ops


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _chunk_rows(n_rows: int, vocab: int, itemsize: int, budget_bytes: int = 8 << 20) -> int:
    """Rows per chunk: logits in the compute dtype of about `budget_bytes` (8 MB: 256 rows at V = 8192 in
    fp32, 512 in bf16). Measured on CPU: 256 and 512 fp32 rows 1.5-2x faster than 2048 with the torch step
    (the chunk stays in cache between its passes); with the native kernel, bf16 head forward + backward
    26-28 ms at 512 rows, 29 ms at 256, 32 ms at 128 and at 1024."""
    return max(1, min(n_rows, budget_bytes // (itemsize * vocab)))


def _group_rows(n_rows: int, vocab: int, chunk_rows: int, itemsize: int, budget_bytes: int = 16 << 20) -> int:
    """Rows whose softmax gradients are kept for one weight-gradient matmul: a whole number of chunks
    within `budget_bytes` (16 MB: 1024 rows of bf16 at V = 8192), at least one chunk. Kept under glibc's
    largest mmap threshold (32 MiB, `sourcelm.train.device`), so the buffer is reused from the heap
    every step instead of being mapped and faulted in again."""
    chunks = max(1, budget_bytes // (itemsize * vocab * chunk_rows))
    return min(n_rows, chunks * chunk_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, compute_dtype, chunk_rows, need_grad, chunk_fn):
        hc, wc = h.to(compute_dtype), weight.to(compute_dtype)
        n, vocab = hc.shape[0], wc.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        if not need_grad:
            for s in range(0, n, chunk_rows):
                loss += chunk_fn(hc[s:s + chunk_rows] @ wc.t(), labels[s:s + chunk_rows], None)
            ctx.grads = None
            return loss
        grad_h, grad_w = torch.empty_like(hc), None
        group_rows = _group_rows(n, vocab, chunk_rows, hc.element_size())
        grad_logits = torch.empty(group_rows, vocab, dtype=compute_dtype, device=h.device)
        for g in range(0, n, group_rows):
            rows = min(group_rows, n - g)
            for s in range(g, g + rows, chunk_rows):
                e = min(s + chunk_rows, g + rows)
                grad_chunk = grad_logits[s - g:e - g]  # the logits, then their gradient in place
                loss += chunk_fn(torch.mm(hc[s:e], wc.t(), out=grad_chunk), labels[s:e], grad_chunk)
                torch.mm(grad_chunk, wc, out=grad_h[s:e])
            if grad_w is None:  # [V, H] in the compute dtype, K = the group's rows
                grad_w = grad_logits[:rows].t() @ hc[g:g + rows]
            else:  # later groups add in the matmul's own fp32 accumulator
                grad_w.addmm_(grad_logits[:rows].t(), hc[g:g + rows])
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.grads = (grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.grads
        del ctx.grads
        if grads is None:
            raise RuntimeError("linear_cross_entropy was run without gradients; it cannot be differentiated")
        grad_h, grad_w = grads
        return (grad_h.mul_(grad_loss).to(ctx.h_dtype), grad_w.to(ctx.w_dtype).mul_(grad_loss),
                None, None, None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_rows: int | None = None, chunk_fn: Callable | None = None) -> torch.Tensor:
    """Sum over labels != -100 of CE(h W^T, labels): h [..., H], weight [V, H], labels [...] (int64).
    Returns an fp32 scalar; differentiable in h and weight. `chunk_fn`: the per-chunk step
    (`reference.chunk_loss_and_grad`'s contract: it, a compiled version of it, or the C kernel); None = the one
    `ops.cross_entropy_chunk` picks for the device."""
    h2 = h.reshape(-1, h.shape[-1])
    y = labels.reshape(-1)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    dtype = _compute_dtype(h, weight)
    rows = chunk_rows or _chunk_rows(h2.shape[0], weight.shape[0], torch.finfo(dtype).bits // 8)
    chunk_fn = chunk_fn or ops.cross_entropy_chunk(h.device)
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h2, weight, y, dtype, rows, need_grad, chunk_fn)
