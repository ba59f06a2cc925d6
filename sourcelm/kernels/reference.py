"""The torch twins of the kernels: the specification every backend is tested against, and the path wherever
no faster kernel takes a call (other devices and dtypes, `torch.compile`, `SOURCELM_KERNELS=torch`).

Each is the plain torch code of one step of the model, written for clarity over speed; `ops.py` picks
between it and the C, AMX (and later CUDA) versions, which must give the same values (the routing, the
row movements and the counting sort index for index; the arithmetic within the tolerances their tests
state).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position without a target


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with transformers' DeepSeek-V3 semantics: normalise in fp32, cast back to x's dtype, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the interleaved pairs (x0, x1), (x2, x3), ... of x [..., T, d] by cos/sin [T, d/2] and returns
    them de-interleaved, [real parts | imaginary parts], in x's dtype (see `model/norm_rope.py`)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gu = [gate | up] along the last dimension."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def route_topk(scores: torch.Tensor, bias: torch.Tensor, n_group: int, per_group_top: int, topk_group: int,
               top_k: int) -> torch.Tensor:
    """DeepSeek-V3's node-limited expert selection on scores s [N, E] and the balancing bias b [E]: with
    s' = s + b, keep the `topk_group` groups whose top `per_group_top` values of s' sum highest (the others
    masked to -inf), then the top-K experts on s' -> int64 [N, K], best first."""
    n_experts = scores.shape[-1]
    biased = scores + bias.float()
    if n_group > 1:
        grouped = biased.view(-1, n_group, n_experts // n_group)
        best = grouped.topk(per_group_top, dim=-1).values  # largest first
        group_scores = best[..., 0].clone()
        for j in range(1, per_group_top):  # added one by one, largest first, as the C kernel does: the same bits
            group_scores += best[..., j]
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        biased = grouped.masked_fill(group_mask[..., None], float("-inf")).view(-1, n_experts)
    return biased.topk(top_k, dim=-1).indices


def chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor | None) -> torch.Tensor:
    """One chunk of the fused head + loss (`model/loss.py`): logits [c, V] (compute dtype) and labels [c] -> the
    sum of CE over the valid labels (fp32). With `grad_out` ([c, V], the logits' dtype) it also writes
    d(sum)/d(logits) = softmax - one-hot there (zero rows for ignored labels; `grad_out` may be `logits`
    itself, overwritten). Log-softmax and softmax in fp32. A function of its own so that `train.compile` can
    fuse its passes into one kernel (`DeepseekV3.compile_blocks`)."""
    logp = logits.float().log_softmax(-1)  # [c, V], fp32
    valid = labels != IGNORE
    target = labels.clamp_min(0)[:, None]
    loss = -(logp.gather(1, target).squeeze(1) * valid).sum()
    if grad_out is None:
        return loss
    p = logp.exp_()  # softmax, in place
    p.scatter_add_(1, target, -valid[:, None].float())  # minus the one-hot of the target
    # eager skips the masking pass when every label counts; compiled code is fused and must not branch on data
    if torch.compiler.is_compiling() or not bool(valid.all()):
        p.mul_(valid[:, None])
    grad_out.copy_(p)  # the cast to the compute dtype, written where the caller keeps it
    return loss


def eager_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v, softmax in fp32: the reference of every attention backend."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.float().softmax(-1).to(q.dtype), v)


def grouped_linear_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, matmul=None) -> torch.Tensor:
    """Rows of x [N, in] grouped by expert (counts [E]) times w[e]^T (w [E, out, in]) -> [N, out], one matmul
    (`matmul(rows, w[e])`, default `F.linear`) per non-empty expert: the reference of every grouped-matmul backend."""
    matmul = matmul or F.linear
    out = []
    for e, (rows, n) in enumerate(zip(x.split(counts.tolist()), counts.tolist())):
        if n:
            out.append(matmul(rows, w[e]))
    return torch.cat(out) if out else x.new_zeros(0, w.shape[1])
