"""Multi-head Latent Attention (report §2.1.1, eq. 1-11), the training (non-absorbed) form.

Keys and values come from a compressed latent c^KV (kv_lora_rank) normalised by `kv_a_layernorm`,
expanded per head by `kv_b_proj` (per head: qk_nope_head_dim key rows, then v_head_dim value rows).
The positional part of the key, k^R (qk_rope_head_dim), is computed once from h and shared by all
heads. Queries come from a compressed latent c^Q (q_lora_rank) or, when `q_lora_rank` is None,
from a plain `q_proj`; per head qk_nope_head_dim rows then qk_rope_head_dim rows.

Module and parameter names are those of the HF checkpoint (`q_a_proj`, `kv_a_proj_with_mqa`, ...),
so the state dict maps 1:1. The absorbed-weight form used with the compressed cache lives in
`sourcelm.infer.mla_cache`; it reads these same weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from sourcelm.config import ModelConfig
from sourcelm.model import amx
from sourcelm.model.norm_rope import RMSNorm, apply_rope, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = softmax_scale(cfg)
        self.impl = cfg.attn_impl
        h = cfg.hidden_size
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.n_heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, feeds_matmul=True)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, feeds_matmul=True)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, h, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (q [B, T, heads, qk_dim] with its rope part not yet rotated, normalised c^KV
        [B, T, kv_lora_rank], unrotated k^R [B, T, rope_dim]). With a q latent, the two down-projections
        of x run as one matmul on their stacked weights: one gradient for x instead of two to sum."""
        kv_width = self.kv_lora_rank + self.rope_dim
        if self.q_lora_rank is None:
            q, kv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            down = torch.cat([self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight])
            q_a, kv = F.linear(x, down).split([self.q_lora_rank, kv_width], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        c_kv, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return q.view(*x.shape[:-1], self.n_heads, self.qk_dim), self.kv_a_layernorm(c_kv), k_rope

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, T, H]; cos/sin [T, rope_dim/2] for positions 0..T-1. Causal self-attention."""
        b, t, _ = x.shape
        q, c_kv, k_rope = self.project(x)
        q_nope, q_rope = q.transpose(1, 2).split([self.nope_dim, self.rope_dim], dim=-1)  # [B, heads, T, .]
        q = torch.cat([q_nope, apply_rope(q_rope, cos, sin)], dim=-1)
        k_rope = apply_rope(k_rope, cos, sin)  # [B, T, rope], shared by all heads
        kv = self.kv_b_proj(c_kv).view(b, t, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(b, self.n_heads, t, self.rope_dim)], dim=-1)

        impl = self.impl if self.impl != "auto" else choose_attention(q, k, v)
        if impl == "amx":
            o = amx.causal_attention(q, k, v, self.scale)
        elif impl == "sdpa":
            o = sdpa_causal(q, k, v, self.scale)
        elif impl == "bmm":
            o = bmm_causal(q, k, v, self.scale)
        else:
            o = eager_causal_attention(q, k, v, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim))


BMM_SCORES_BUDGET = 64 << 20  # bytes of one layer's [B, heads, T, T] scores up to which "auto" picks "bmm" on CPU


def choose_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """What `attn_impl = "auto"` runs. On the CPU while one layer's scores ([B, heads, T, T] in the compute dtype)
    fit in 64 MB: "amx" where the AMX kernel takes the call (bf16, `amx.attention_takes`), else "bmm"; beyond
    that "sdpa". On the CPU torch's flash-attention backward is slow at short sequences: fwd + bwd of the tiny
    preset's attention core (B 8, 4 heads, T 256, 2 threads) took 8.4-9.3 ms with "sdpa" and 3.5-3.9 ms with
    "bmm" in bf16, 7.7-8.4 and 7.2 ms in fp32; "amx" 1.9 ms against 3.2 for "bmm" in the same run. GPUs always
    get the flash kernels."""
    b, h, t, _ = q.shape
    if q.device.type == "cpu" and b * h * t * t * q.element_size() <= BMM_SCORES_BUDGET:
        return "amx" if amx.attention_takes(q, k, v) else "bmm"
    return "sdpa"


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


def eager_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain reference: softmax(q k^T * scale + causal mask) v, softmax in fp32."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.float().softmax(-1).to(q.dtype), v)
