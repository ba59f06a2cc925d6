"""Decoding with the compressed MLA cache and absorbed weights (report §2.1.1; DeepSeek-V2 §2.1.2).

Per layer and token the cache keeps only the normalised latent c^KV (kv_lora_rank values) and the
rotated shared rope key k^R (qk_rope_head_dim values): 576 values for DeepSeek-V3 instead of the
32,768 of full multi-head keys and values. Attention never expands them per head:

  q_lat   = q_nope · W_UK                 (W_UK absorbed into the query: [heads, kv_lora_rank])
  score   = (q_lat · c^KV + q_rope · k^R) * softmax_scale
  o_lat   = softmax(score) · c^KV         ([heads, kv_lora_rank])
  o       = o_lat · W_UV^T -> o_proj      (W_UV applied after the weighted sum)

where W_UK / W_UV are the key / value rows of `kv_b_proj` per head. This is algebraically the
training-form attention of `sourcelm.model.attention.MLA`, with the same weights; the tests check the
logits against the full forward.
"""

from __future__ import annotations

import torch

from sourcelm.config import ModelConfig
from sourcelm.model.attention import MLA
from sourcelm.model.norm_rope import apply_rope


class MLACache:
    """Latents [layers, B, max_len, kv_lora_rank] and rope keys [layers, B, max_len, rope_dim]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        layers = cfg.num_hidden_layers
        self.latent = torch.zeros(layers, batch, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.rope = torch.zeros(layers, batch, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)
        self.length = 0  # tokens stored so far
        self.max_len = max_len

    def bytes_per_token(self) -> int:
        batch, max_len = self.latent.shape[1:3]
        total = self.latent.numel() * self.latent.element_size() + self.rope.numel() * self.rope.element_size()
        return total // (batch * max_len)


def absorbed_attention(attn: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: MLACache,
                       layer: int, start: int) -> torch.Tensor:
    """x [B, S, H] for positions start..start+S-1 (cos/sin for those positions); writes this step's latents
    into the cache and attends over positions 0..start+S-1. Returns [B, S, H]."""
    b, s, _ = x.shape
    q, c_kv, k_rope = attn.project(x)
    q_nope, q_rope = q.transpose(1, 2).split([attn.nope_dim, attn.rope_dim], dim=-1)  # [B, heads, S, .]
    q_rope = apply_rope(q_rope, cos, sin)
    cache.latent[layer, :, start:start + s] = c_kv
    cache.rope[layer, :, start:start + s] = apply_rope(k_rope, cos, sin)
    latent, rope = cache.latent[layer, :, :start + s], cache.rope[layer, :, :start + s]

    w = attn.kv_b_proj.weight.view(attn.n_heads, attn.nope_dim + attn.v_dim, attn.kv_lora_rank)
    w_uk, w_uv = w[:, : attn.nope_dim], w[:, attn.nope_dim:]
    q_lat = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
    scores = (torch.einsum("bhsr,btr->bhst", q_lat, latent)
              + torch.einsum("bhsd,btd->bhst", q_rope, rope)) * attn.scale
    t = start + s
    causal = torch.ones(s, t, dtype=torch.bool, device=x.device).tril(start)
    scores = scores.masked_fill(~causal, float("-inf"))
    probs = scores.float().softmax(-1).to(x.dtype)
    o_lat = torch.einsum("bhst,btr->bhsr", probs, latent)
    o = torch.einsum("bhsr,hvr->bshv", o_lat, w_uv)
    return attn.o_proj(o.reshape(b, s, attn.n_heads * attn.v_dim))


@torch.no_grad()
def forward_cached(model, ids: torch.Tensor, cache: MLACache) -> torch.Tensor:
    """Runs the main model on ids [B, S] that follow the cache's contents; returns logits [B, S, V]."""
    start, s = cache.length, ids.shape[1]
    if start + s > cache.max_len:
        raise ValueError(f"cache holds {cache.max_len} tokens; {start + s} needed")
    h = model.model.embed_tokens(ids)
    cos, sin = model.rotary(torch.arange(start, start + s, device=ids.device), h.dtype)
    for i, layer in enumerate(model.model.layers):
        h = h + absorbed_attention(layer.self_attn, layer.input_layernorm(h), cos, sin, cache, i, start)
        x = layer.post_attention_layernorm(h)
        h = h + (layer.mlp(x)[0] if layer.is_moe else layer.mlp(x))
    cache.length = start + s
    return model.lm_head(model.model.norm(h))
