"""The fused elementwise CPU kernels: the loss's per-chunk softmax and gradient, RMSNorm, MLA's rotary
embedding and SwiGLU, each one pass forward and one backward where torch makes a chain of passes over a
tensor that does not stay in cache (what each computes: the comment atop its C file; the figures:
`bench/RESULTS_train.md`). Their torch twins, the specification: `sourcelm.kernels.reference`.
"""

from __future__ import annotations

import torch

from sourcelm.kernels.build import takes, variant

NORM_BLOCK = 32  # rows per partial weight-gradient sum in rms_norm.c


# ---------------------------------------------------------------------------------- cross-entropy

def chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor | None,
                        ignore_index: int = -100) -> torch.Tensor:
    """Same contract as `reference.chunk_loss_and_grad`: the summed loss (fp32 scalar); the gradient of that sum
    with respect to the logits written into `grad_out` (same shape and dtype as the logits; may be the
    logits themselves) if given."""
    if not takes(logits):
        raise ValueError(f"the native loss kernel takes bf16 or fp32 CPU logits, not {logits.dtype} on {logits.device}")
    if grad_out is not None and (grad_out.shape != logits.shape or grad_out.dtype != logits.dtype
                                 or not grad_out.is_contiguous()):
        raise ValueError("grad_out must be a contiguous tensor of the logits' shape and dtype")
    logits, labels = logits.contiguous(), labels.to(torch.int64).contiguous()
    rows, vocab = logits.shape
    bad = (labels >= vocab) | ((labels < 0) & (labels != ignore_index))
    if bool(bad.any()):  # the kernel would read outside the row
        raise ValueError(f"label {int(labels[bad][0])} outside [0, {vocab}) (and not the ignore index "
                         f"{ignore_index}): the token shards hold ids the model's vocab_size does not cover")
    row_loss = torch.empty(rows, dtype=torch.float32)
    variant("cross_entropy_rows", logits.dtype)(
        logits.data_ptr(), labels.data_ptr(), rows, vocab, ignore_index,
        grad_out.data_ptr() if grad_out is not None else None, row_loss.data_ptr())
    return row_loss.sum()


# ---------------------------------------------------------------------------------------- RMSNorm

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        rows2d = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.empty(rows2d.shape, dtype=out_dtype)
        rstd = torch.empty(rows2d.shape[0], dtype=torch.float32)
        variant("rms_norm_forward", x.dtype, out_dtype)(rows2d.data_ptr(), weight.data_ptr(), rows2d.shape[0],
                                                         rows2d.shape[1], eps, y.data_ptr(), rstd.data_ptr())
        ctx.save_for_backward(rows2d, weight, rstd)
        ctx.x_shape, ctx.out_dtype = x.shape, out_dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        rows, dim = x.shape
        dy = dy.reshape(rows, dim).to(ctx.out_dtype).contiguous()
        dx = torch.empty_like(x)
        partial = torch.empty((rows + NORM_BLOCK - 1) // NORM_BLOCK, dim, dtype=torch.float32)
        dw = torch.empty(dim, dtype=torch.float32)
        variant("rms_norm_backward", x.dtype, ctx.out_dtype)(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                                                              dy.data_ptr(), rows, dim, dx.data_ptr(),
                                                              partial.data_ptr(), dw.data_ptr())
        return dx.view(ctx.x_shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`reference.rms_norm` (RMSNorm) for a CPU x (bf16 or fp32) and an fp32 weight: fp32 output, or bf16 (the
    fp32 output rounded once, for a norm that feeds bf16 matmuls)."""
    if not (takes(x) and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and out_dtype in (torch.float32, torch.bfloat16)):
        raise ValueError("the native RMSNorm takes a bf16 or fp32 CPU input and an fp32 CPU weight, and writes fp32 "
                         "or bf16")
    return _RMSNorm.apply(x, weight.contiguous(), eps, out_dtype)


# ------------------------------------------------------------------------------------------ RoPE

class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        x4 = x if x.dim() == 4 else x.unsqueeze(1)  # [n0, n1, T, d]; keys come without the head dim
        n0, n1, t, d = x4.shape
        y = torch.empty(x4.shape, dtype=x.dtype)
        variant("rope_forward", x.dtype)(x4.data_ptr(), n0, n1, t, d, x4.stride(0), x4.stride(1), x4.stride(2),
                                          cos.data_ptr(), sin.data_ptr(), y.data_ptr())
        ctx.save_for_backward(cos, sin)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(dy)
        variant("rope_backward", dy.dtype)(dy.data_ptr(), dy.numel() // dy.shape[-1], cos.shape[0], dy.shape[-1],
                                            cos.data_ptr(), sin.data_ptr(), dx.data_ptr())
        return dx, None, None


def rope_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope` runs this call: a CPU x (bf16 or fp32) [n0, n1, T, d] or [n0, T, d] with unit stride
    along d, and fp32 cos/sin [T, d/2] that need no gradient."""
    return (takes(x) and x.dim() in (3, 4) and x.stride(-1) == 1 and x.shape[-1] % 2 == 0
            and all(c.dtype == torch.float32 and c.device.type == "cpu" and c.is_contiguous() and not c.requires_grad
                    and c.shape == (x.shape[-2], x.shape[-1] // 2) for c in (cos, sin)))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`norm_rope.apply_rope` (the rotated pairs de-interleaved, in x's dtype) as one kernel forward and one
    backward; the call must satisfy `rope_takes`."""
    if not rope_takes(x, cos, sin):
        raise ValueError("the native RoPE takes a [.., T, d] CPU x with unit stride along d and fp32 [T, d/2] cos/sin")
    return _Rope.apply(x, cos, sin)


# ---------------------------------------------------------------------------------------- SwiGLU

class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu):
        rows2d = gu.reshape(-1, gu.shape[-1])  # a view: rows keep gu's row stride
        n = gu.shape[-1] // 2
        h = torch.empty(*gu.shape[:-1], n, dtype=gu.dtype)
        variant("swiglu_forward", gu.dtype)(rows2d.data_ptr(), rows2d.shape[0], n, rows2d.stride(0), h.data_ptr())
        ctx.save_for_backward(gu)
        return h

    @staticmethod
    def backward(ctx, dh):
        (gu,) = ctx.saved_tensors
        rows2d = gu.reshape(-1, gu.shape[-1])
        dh = dh.to(gu.dtype).contiguous()
        dgu = torch.empty(gu.shape, dtype=gu.dtype)
        variant("swiglu_backward", gu.dtype)(rows2d.data_ptr(), dh.data_ptr(), rows2d.shape[0], gu.shape[-1] // 2,
                                              rows2d.stride(0), dgu.data_ptr())
        return dgu


def swiglu_takes(gu: torch.Tensor) -> bool:
    """Whether `swiglu` runs this call: a CPU gu (bf16 or fp32) [..., 2n] whose rows have unit stride and one
    row stride (a contiguous tensor, or rows sliced out of a wider one)."""
    if not (takes(gu) and gu.dim() >= 1 and gu.shape[-1] % 2 == 0 and gu.stride(-1) == 1):
        return False
    try:
        gu.view(-1, gu.shape[-1])
    except RuntimeError:
        return False
    return True


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gu = [gate | up] along the last dimension, as one kernel forward and one backward
    (whose gradient comes back in the same [gate | up] layout); the call must satisfy `swiglu_takes`."""
    if not swiglu_takes(gu):
        raise ValueError("the native SwiGLU takes a bf16 or fp32 CPU gu [..., 2n] with unit stride along the last "
                         "dimension")
    return _SwiGLU.apply(gu)

