"""DeepSeekMoE: the sigmoid router with auxiliary-loss-free bias, dropless routed experts, shared experts,
and the complementary sequence-wise balance loss (report §2.1.2, eq. 12-20).

Routing (`Router.forward`, fp32 throughout):
  s = sigmoid(x W^T); s' = s + b (b = `e_score_correction_bias`, a buffer: selection only, never a gradient)
  group score = sum of the top `group_score_topk` values of s' in the group (unset: 2, the released rule);
  keep `topk_group` groups and mask the others to -inf; top-K experts on s'; weights = s at those experts,
  divided by their sum when `norm_topk_prob`, times `routed_scaling_factor`.
  Agreement with the released code: DeepSeek-V3's inference code and transformers (5.x) both sum the top 2
  whatever K / topk_group is (the report's reading, equal to 2 only for shapes like DeepSeek-V3's 8 / 4),
  so that is the default and any other count is a local choice export refuses.
  Some HF-derived copies mask with 0.0 instead; that differs when a kept expert's s' < 0, which
  happens once the balancer has pushed an overloaded expert's bias below -s: -inf is the safe choice.
  The selection is `ops.route_topk` (one C pass per token on the CPU, equal index for index to its torch
  code, `sourcelm.kernels.reference.route_topk`, which every other device runs).

Routed experts (`RoutedExperts`) keep their weights as 3-D parameters w1/w3 [E, I, H] (gate/up) and
w2 [E, H, I] (down). The fast path gathers the token copies into rows grouped by expert
(`ops.group_by_expert`, `ops.dispatch_rows`), runs one grouped matmul per projection (`ops.expert_ffn`), and
gathers the weighted outputs back (`ops.combine_rows`). The plain reference (`moe_impl = "loop"`) loops over
experts on the unsorted tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sourcelm.config import ModelConfig
from sourcelm.kernels import ops
from sourcelm.model.linear import Linear


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)); used for dense layers and shared experts. The gate and up
    projections run as one matmul on their stacked weights (one input gradient, not two to sum)."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inner)
        self.up_proj = Linear(hidden, inner)
        self.down_proj = Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        return ops.swiglu_linear(ops.linear(x, gate_up), self.down_proj.weight)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.per_group_top = cfg.resolved_group_score_topk
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` must not round the bias: its updates (γ = 1e-3) are below bf16
        # resolution. Convert a copy and keep only its device; the values stay the fp32 ones.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        self.e_score_correction_bias = bias.to(self.e_score_correction_bias.device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> (topk_idx [N, K] int64, topk_weights [N, K] fp32, scores s [N, E] fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # the router stays fp32 under autocast too
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        with torch.no_grad():  # selection is discrete: no gradient flows through it
            topk_idx = ops.route_topk(scores, self.e_score_correction_bias, self.n_group, self.per_group_top,
                                      self.topk_group, self.top_k)
        weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return topk_idx, weights * self.scaling, scores


class RoutedExperts(nn.Module):
    """E SwiGLU experts of width I. Replaceable from outside (expert parallelism) by any module with
    the same `forward` signature."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, h = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.n_experts = e
        self.impl = cfg.moe_impl
        self.w1 = nn.Parameter(torch.empty(e, i, h))  # gate_proj of each expert
        self.w3 = nn.Parameter(torch.empty(e, i, h))  # up_proj
        self.w2 = nn.Parameter(torch.empty(e, h, i))  # down_proj

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                overlap: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, H], topk_idx [N, K] int64, topk_weights [N, K] -> sum_k w_k * expert_{idx_k}(x), plus
        `overlap()` when given (a distributed version runs it while its all-to-all is in flight). Under FP8 x and the
        output's gradient are rounded as the FP8 dispatch would deliver them (`ops.routed_experts_input`), so
        that one process computes what expert parallelism does."""
        x = ops.routed_experts_input(x)
        if self.impl == "loop":
            out = self._forward_loop(x, topk_idx, topk_weights)
        else:
            out = self._forward_grouped(x, topk_idx, topk_weights)
        out = ops.routed_experts_output(out)
        return out + overlap() if overlap is not None else out

    def _forward_grouped(self, x, topk_idx, topk_weights):
        return grouped_experts_forward(x, topk_idx, topk_weights, self.w1, self.w2, self.w3)

    def _forward_loop(self, x, topk_idx, topk_weights):
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            token, slot = torch.where(topk_idx == e)
            if token.numel() == 0:
                continue
            xe = x[token]
            ye = F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e])
            out = out.index_add(0, token, ye * topk_weights[token, slot, None].to(x.dtype))
        return out


def grouped_experts_forward(x: torch.Tensor, slot_expert: torch.Tensor, slot_weights: torch.Tensor,
                            w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """x [N, H], slot_expert [N, K] (ids into the experts of w1/w2/w3; -1: computed elsewhere), slot_weights [N, K]
    -> sum over the slots here of weight * expert(x) [N, H]: the token copies gathered into rows grouped by
    expert, one grouped SwiGLU, the weighted rows gathered back. Computes in autocast's dtype when it is on
    (`_grouped_mm` is not on its cast list)."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    layout = ops.group_by_expert(slot_expert, w1.shape[0], ops.expert_row_alignment(x.device, dtype))
    y = ops.expert_ffn(ops.dispatch_rows(x, layout, dtype), layout.counts, w1, w2, w3)
    return ops.combine_rows(y, slot_weights, layout)


def sequence_balance_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_experts: int, top_k: int,
                          token_mask: torch.Tensor | None) -> torch.Tensor:
    """Report eq. 17-20 without α, averaged over sequences. scores [B, T, E] (unbiased sigmoid s),
    topk_idx [B, T, K] (the actual selection); masked-out positions (padding) are left out of both
    f_i and P_i and out of T."""
    b, t, _ = scores.shape
    if token_mask is None:
        valid = scores.new_ones(b, t)
    else:
        valid = token_mask.to(scores.dtype)
    n_valid = valid.sum(1).clamp_min(1)  # [B]
    with torch.no_grad():
        hits = torch.zeros(b, t, n_experts, dtype=scores.dtype, device=scores.device)
        hits.scatter_(2, topk_idx, 1.0)
        f = (hits * valid[..., None]).sum(1) * (n_experts / (top_k * n_valid[:, None]))  # [B, E]
    s_norm = scores / scores.sum(-1, keepdim=True)
    p = (s_norm * valid[..., None]).sum(1) / n_valid[:, None]  # [B, E]
    if b == 0:  # no sequences (an empty micro-batch slice): nothing to balance, keep the graph
        return scores.sum() * 0.0
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, balance_alpha: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, H] -> (output [B, T, H], expert token counts int64 [E] over unmasked positions,
        α-weighted sequence-wise balance loss (a 0-dim tensor; 0 when α = 0))."""
        b, t, h = x.shape
        flat = x.reshape(-1, h)
        topk_idx, topk_weights, scores = self.gate(flat)
        overlap = (lambda: self.shared_experts(flat)) if self.shared_experts is not None else None
        out = self.experts(flat, topk_idx, topk_weights, overlap=overlap)
        with torch.no_grad():
            idx = topk_idx if token_mask is None else topk_idx[token_mask.reshape(-1).bool()]
            counts = torch.bincount(idx.reshape(-1), minlength=self.n_experts)
        if balance_alpha:
            balance = balance_alpha * sequence_balance_loss(
                scores.view(b, t, self.n_experts), topk_idx.view(b, t, self.top_k), self.n_experts, self.top_k,
                token_mask)
        else:
            balance = scores.new_zeros(())
        return out.view(b, t, h), counts, balance
