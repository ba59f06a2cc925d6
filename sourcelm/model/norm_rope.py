"""RMSNorm and the decoupled rotary embedding of MLA, with YaRN context extension.

Semantics follow transformers' DeepSeek-V3 (and the released checkpoint):

* RMSNorm normalises in fp32, casts back to the input dtype, then scales by its weight
  (`sourcelm.kernels.reference.rms_norm`; `ops.rms_norm` runs it as one C kernel each way on the CPU).
  A norm built with `feeds_matmul=True` (its output only feeds matmuls, which autocast runs in bf16)
  returns the autocast dtype under autocast: the cast the matmul would make, made by the norm's own
  store, so the values are the same and one pass over the activation (and one over its gradient) less.
* RoPE acts only on the `qk_rope_head_dim` slice. The checkpoint lays those dims out as interleaved
  pairs (x0, x1), (x2, x3), ...; pair i turns at frequency theta^(-2i/d). We rotate the even/odd
  slices directly and write the result de-interleaved (all rotated "real" parts, then all "imaginary"
  parts). Queries and keys get the same permutation, so q.k is unchanged; this is what HF does with
  `rope_interleave=True`, and it saves the copy a de-interleaving view would cost.
* YaRN (`rope_scaling.type == "yarn"`): per-frequency blend between the original and the
  `factor`-interpolated frequency with a linear ramp over the correction range given by
  `beta_fast`/`beta_slow`; cos/sin are multiplied by `attention_factor`
  (= mscale(factor, mscale) / mscale(factor, mscale_all_dim), or mscale(factor) when those two keys are
  absent), and the softmax scale by mscale(factor, mscale_all_dim)^2. With the official
  mscale = mscale_all_dim = 1 that is: cos/sin unscaled, softmax scale times (0.1 ln 40 + 1)^2 = 1.874.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sourcelm.config import ModelConfig
from sourcelm.kernels import ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, feeds_matmul: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.feeds_matmul = feeds_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        out = torch.get_autocast_dtype(dev) if self.feeds_matmul and torch.is_autocast_enabled(dev) else None
        return ops.rms_norm(x, self.weight, self.eps, out)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """The YaRN attention-entropy correction sqrt(t) = 0.1 * mscale * ln(factor) + 1 (1 when not stretched)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_kind(cfg: ModelConfig) -> str:
    rs = cfg.rope_scaling
    if not rs:
        return "default"
    return rs.get("type", rs.get("rope_type", "default")) or "default"


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [qk_rope_head_dim // 2] (fp32) and the factor that multiplies cos/sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    pos_freqs = base ** exponents
    inv_freq = 1.0 / pos_freqs
    if _yarn_kind(cfg) != "yarn":
        return inv_freq, 1.0
    rs = cfg.rope_scaling
    orig = rs["original_max_position_embeddings"]
    factor = rs.get("factor") or cfg.max_position_embeddings / orig
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # the dimension index whose wavelength fits `rotations` times into the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (extrapolated) frequency, 0: use the interpolated one
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - keep) + inv_freq * keep
    return inv_freq, float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    scale = cfg.qk_head_dim ** -0.5
    if _yarn_kind(cfg) == "yarn":
        mscale_all_dim = cfg.rope_scaling.get("mscale_all_dim", 0)
        if mscale_all_dim:
            factor = cfg.rope_scaling.get("factor") or (
                cfg.max_position_embeddings / cfg.rope_scaling["original_max_position_embeddings"])
            scale *= yarn_mscale(factor, mscale_all_dim) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Produces cos/sin [T, d/2] for given positions; the tables are recomputed, never stored in checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # computed on the CPU, then moved to the default device: a model built on the meta device (FLOPs, plans)
        # would otherwise run these few ops through torch's decompositions, which import torch._dynamo (2.5 s)
        with torch.device("cpu"):
            inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        cos = (angles.cos() * self.attention_factor).to(dtype)
        sin = (angles.sin() * self.attention_factor).to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates interleaved pairs of the last dim of x [..., T, d] by cos/sin [T, d/2] (broadcast over the
    leading dims); returns the rotated pairs de-interleaved: [real parts | imaginary parts], in x's dtype.
    The rotation runs in the promoted dtype (fp32 for bf16 projections under autocast, whose cos/sin
    follow the fp32 residual stream) and is rounded once at the end: the rotated part then joins its
    bf16 neighbours as bf16, where an fp32 result would turn the whole query and key fp32 and leave the
    attention matmuls (autocast) to cast them, and the causal mask, back, a copy each (~1 ms per layer)."""
    return ops.rope(x, cos, sin)
