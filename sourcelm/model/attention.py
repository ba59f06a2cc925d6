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

import torch
from torch import nn

from sourcelm.config import ModelConfig
from sourcelm.kernels import ops
from sourcelm.model.linear import Linear
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
            self.q_proj = Linear(h, self.n_heads * self.qk_dim)
        else:
            self.q_a_proj = Linear(h, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, feeds_matmul=True)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * self.qk_dim)
        self.kv_a_proj_with_mqa = Linear(h, cfg.kv_lora_rank + self.rope_dim)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, feeds_matmul=True)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, h)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (q [B, T, heads, qk_dim] with its rope part not yet rotated, normalised c^KV
        [B, T, kv_lora_rank], unrotated k^R [B, T, rope_dim]). With a q latent, the two down-projections
        of x run as one matmul on their stacked weights: one gradient for x instead of two to sum."""
        kv_width = self.kv_lora_rank + self.rope_dim
        if self.q_lora_rank is None:
            q, kv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            down = torch.cat([self.q_a_proj.weight, self.kv_a_proj_with_mqa.weight])
            q_a, kv = ops.linear(x, down).split([self.q_lora_rank, kv_width], dim=-1)
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

        return ops.attention_output(q, k, v, self.scale, self.impl, self.o_proj.weight)
