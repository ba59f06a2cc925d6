"""The matmul kernels for CPUs with Intel AMX (`csrc/grouped_gemm.c`, `csrc/causal_attention.c`, built
with the other C kernels by `build.py`): the routed experts' grouped matmuls and causal
attention, bf16 with fp32 accumulation, forward and backward.

Why: on the CPU torch reaches AMX through oneDNN, one call per matmul with ~20 us of set-up each, and the
routed experts need one call per expert group, attention a chain of batched matmuls and softmax passes over
[B*heads, T, T] scores (the figures: `bench/RESULTS_train.md` and each kernel's comment).

Each `*_takes` says whether its kernel runs a call (a CPU with AMX whose OS grants the tile registers, bf16
operands, shapes in multiples of the 32-element blocks); where not, `ops.py` runs the torch code, which
stays the reference. Both kernels give the same bits on any thread count. `SOURCELM_AMX=0` switches them
off (the other native kernels stay on).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from sourcelm.kernels import build

log = logging.getLogger(__name__)

BLOCK = 32  # the kernels' output blocks and contraction steps


@functools.cache
def ready() -> bool:
    """Whether the AMX kernels run here: built for a CPU that has AMX and granted its registers by the OS, and
    not switched off (`SOURCELM_AMX=0`)."""
    if os.environ.get("SOURCELM_AMX", "1") == "0":
        log.info("AMX kernels off (SOURCELM_AMX=0): torch's matmuls run")
        return False
    ok = build.available() and bool(build.library().amx_kernels_ready())
    log.info("matmul kernels on the CPU: %s", "AMX (grouped_gemm.c, causal_attention.c)" if ok else "torch's")
    return ok


def _bf16_cpu(*tensors: torch.Tensor) -> bool:
    return all(build.takes(t) and t.dtype == torch.bfloat16 for t in tensors)


# ------------------------------------------------------------------------------ routed-expert matmuls

def grouped_linear_takes(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> bool:
    """Whether `grouped_linear` runs this call: bf16 CPU rows x [P, K] grouped by counts [E] (each a multiple of
    32, summing to P > 0) and bf16 weights w [E, N, K] with N and K multiples of 32, on a CPU with AMX."""
    return (_bf16_cpu(x, w) and x.dim() == 2 and w.dim() == 3 and x.shape[0] > 0 and x.shape[1] == w.shape[2]
            and w.shape[1] % BLOCK == 0 and w.shape[2] % BLOCK == 0 and counts.numel() == w.shape[0]
            and bool((counts % BLOCK == 0).all()) and int(counts.sum()) == x.shape[0] and ready())


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, ends, sink):
        x, w = x.contiguous(), w.contiguous()
        e, n, k = w.shape
        out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
        packed = torch.empty(w.numel() // 2, dtype=torch.int32)
        build.library().grouped_gemm_forward(x.data_ptr(), w.data_ptr(), ends.data_ptr(), e, n, k,
                                               packed.data_ptr(), out.data_ptr())
        ctx.save_for_backward(x, w, ends)
        ctx.sink = sink
        return out

    @staticmethod
    def backward(ctx, g):
        x, w, ends = ctx.saved_tensors
        e, n, k = w.shape
        g = g.to(torch.bfloat16).contiguous()
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = torch.empty_like(x)
            packed = torch.empty(w.numel() // 2, dtype=torch.int32)
            build.library().grouped_gemm_input_grad(g.data_ptr(), w.data_ptr(), ends.data_ptr(), e, n, k,
                                                      packed.data_ptr(), gx.data_ptr())
        if ctx.sink is not None:  # the zero-bubble W split: the weight's gradient is computed when the W op runs
            ctx.sink.file(lambda: _weight_grad(g, x, w, ends))
        elif ctx.needs_input_grad[1]:
            gw = _weight_grad(g, x, w, ends)
        return gx, gw, None, None


def _weight_grad(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    e, n, k = w.shape
    gw = torch.empty_like(w)
    g_t = torch.empty(n, x.shape[0], dtype=torch.bfloat16)
    x_pairs = torch.empty(x.numel() // 2, dtype=torch.int32)
    build.library().grouped_gemm_weight_grad(g.data_ptr(), x.data_ptr(), ends.data_ptr(), e, n, k,
                                               g_t.data_ptr(), x_pairs.data_ptr(), gw.data_ptr())
    return gw


def grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, sink=None) -> torch.Tensor:
    """Rows of x [P, K] grouped by expert (counts [E]) times w[e]^T (w [E, N, K]) -> [P, N], bf16 with fp32
    accumulation, as `torch._grouped_mm(x, w.transpose(-2, -1), offs=counts.cumsum(0))` computes it; the call
    must satisfy `grouped_linear_takes`. sink (`ops.WeightGradSink`, holding w): backward files w's gradient
    there instead of returning it."""
    if not grouped_linear_takes(x, w, counts):
        raise ValueError("the AMX grouped matmul takes bf16 CPU rows [P, K] in groups of multiples of 32 and bf16 "
                         "weights [E, N, K] with N and K multiples of 32, on a CPU with AMX")
    return _GroupedLinear.apply(x, w if sink is None else w.detach(), counts.to(torch.int64).cumsum(0), sink)


# ------------------------------------------------------------------------------------ causal attention

def attention_head_sizes_fit(qk_dim: int, v_dim: int) -> bool:
    """Whether the attention kernel takes these head sizes (q/k a multiple of 16, v of 32)."""
    return qk_dim % 16 == 0 and v_dim % BLOCK == 0


def attention_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `causal_attention` runs this call: bf16 CPU q, k [B, H, T, D] and v [B, H, T, Dv] with T and Dv
    multiples of 32 and D of 16, on a CPU with AMX."""
    return (_bf16_cpu(q, k, v) and q.dim() == 4 and q.shape == k.shape and v.shape[:3] == q.shape[:3]
            and q.shape[2] % BLOCK == 0 and q.shape[2] > 0 and attention_head_sizes_fit(q.shape[3], v.shape[3])
            and ready())


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, h, t, d = q.shape
        dv = v.shape[3]
        o = torch.empty(b, t, h, dv, dtype=torch.bfloat16)  # heads last: the output projection's layout
        p = torch.empty(b * h, t, t, dtype=torch.bfloat16)
        if build.library().causal_attention_forward(q.data_ptr(), k.data_ptr(), v.data_ptr(), b, h, t, d, dv, scale,
                                                      o.data_ptr(), p.data_ptr()):
            raise MemoryError("causal_attention could not allocate its per-thread scratch")
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        return o.transpose(1, 2)

    @staticmethod
    def backward(ctx, do):
        q, k, v, p = ctx.saved_tensors
        b, h, t, d = q.shape
        do = do.to(torch.bfloat16).transpose(1, 2).contiguous()  # [B, T, H, Dv], as the forward wrote o
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if build.library().causal_attention_backward(q.data_ptr(), k.data_ptr(), v.data_ptr(), p.data_ptr(),
                                                       do.data_ptr(), b, h, t, d, v.shape[3], ctx.scale,
                                                       dq.data_ptr(), dk.data_ptr(), dv.data_ptr()):
            raise MemoryError("causal_attention could not allocate its per-thread scratch")
        return dq, dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + causal mask) v for q, k [B, H, T, D], v [B, H, T, Dv] -> [B, H, T, Dv] (a view of
    a [B, T, H, Dv] tensor), scores and softmax in fp32, the probabilities kept in bf16 for backward; the
    call must satisfy `attention_takes`."""
    if not attention_takes(q, k, v):
        raise ValueError("the AMX attention takes bf16 CPU q, k [B, H, T, D], v [B, H, T, Dv] with T and Dv "
                         "multiples of 32 and D of 16, on a CPU with AMX: for other calls set model.attn_impl to "
                         "\"auto\" (which picks it only where it runs) or \"bmm\"")
    return _CausalAttention.apply(q, k, v, float(scale))
