"""The causal attention backends in torch: "bmm" (the scores materialised by one batched matmul, for short
sequences on the CPU) and "sdpa" (torch's fused kernels, flash where the device has them, O(T) memory).
Their reference is `reference.eager_causal_attention`; the AMX kernel is `amx.causal_attention`; which one runs
a call is `ops.causal_attention`'s choice.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=16)
def causal_bias(t: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[T, T]: 0 on and below the diagonal, -inf above it; kept for the last few (T, dtype, device)."""
    above = torch.ones(t, t, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(t, t, dtype=dtype, device=device).masked_fill(above, float("-inf"))


def bmm_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention as two batched matmuls around a softmax: the scores come out of one `baddbmm` that
    adds the causal mask as a bias, and autograd keeps the softmax output for backward (O(B·heads·T²)
    memory, so "auto" only picks it for short sequences). The scores are rounded to the compute dtype
    before the softmax, as in HF's eager attention; the softmax itself runs in fp32 inside torch's kernel.
    Measured against fp64 on the tiny preset's shapes in bf16: output error 0.33 % here, 0.19 % with the
    flash kernel, which keeps the scores in fp32 (bf16's own rounding is 0.39 %)."""
    b, h, t, d = q.shape
    dv = v.shape[-1]
    scores = torch.baddbmm(causal_bias(t, q.dtype, q.device).expand(b * h, t, t), q.reshape(b * h, t, d),
                           k.reshape(b * h, t, d).transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(-1), v.reshape(b * h, t, dv)).view(b, h, t, dv)


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """F.scaled_dot_product_attention, causal. MLA's values are narrower than its queries/keys (v_head_dim <
    qk_head_dim); the fused (flash) kernels want one head size, and with two they fall back to the unfused
    math path (measured on CPU: fwd+bwd 1.7x slower for the tiny preset's heads). So v is zero-padded to the
    query width and the extra output columns, all zero, are dropped."""
    pad = q.shape[-1] - v.shape[-1]
    if pad <= 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)), is_causal=True, scale=scale)
    return o[..., : v.shape[-1]]
