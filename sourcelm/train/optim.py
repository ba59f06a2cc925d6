"""AdamW over a flat buffer, shardable over data-parallel ranks (ZeRO-1).

The report trains with AdamW(β1 0.9, β2 0.95, weight decay 0.1) and shards optimizer state over
data-parallel ranks (ZeRO-1). One implementation serves both cases: the parameters of a group are
viewed as one flat fp32 vector; a rank owns the contiguous slice [lo, hi) of it (the whole vector
without sharding), keeps Adam moments for that slice only, updates it, and the updated slices are
all-gathered back into the parameters. The update is elementwise, so a sharded run produces the
same bits as an unsharded one.

Weight decay: applied to matrices (linear weights, embeddings, the head, experts) and not to
vectors (RMSNorm gains) nor to the router's expert-bias, which is a buffer outside the optimizer.
This is the usual convention (decay shrinks weights that multiply activations; decaying a norm gain
towards zero would fight the normalisation); the report does not publish its exclusion list.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def decays(name: str, param: nn.Parameter) -> bool:
    return param.ndim >= 2


class FlatAdamW:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=0.1, group: dist.ProcessGroup | None = None):
        # matrices first, then vectors: one boundary index instead of a per-element decay mask
        ordered = [np for np in named_params if decays(*np)] + [np for np in named_params if not decays(*np)]
        self.names = [n for n, _ in ordered]
        self.params = [p for _, p in ordered]
        self.decay_end = sum(p.numel() for n, p in ordered if decays(n, p))
        self.numel = sum(p.numel() for p in self.params)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        self.shard = -(-self.numel // self.world)  # padded so every rank's slice has the same size
        self.lo, self.hi = rank * self.shard, min((rank + 1) * self.shard, self.numel)
        n = max(self.hi - self.lo, 0)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.exp_avg = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.exp_avg_sq = torch.zeros(n, dtype=torch.float32, device=self.device)
        self.step_count = 0

    # -- flat views -------------------------------------------------------------------------------
    def _flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.reshape(-1).float() for t in tensors]) if tensors else torch.zeros(0, device=self.device)

    def flat_grads(self) -> torch.Tensor:
        return self._flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])

    def grad_sq_sum(self) -> torch.Tensor:
        """Σ g² over this group's (replicated or local) gradients, in fp64 for a stable norm."""
        return sum((p.grad.double().pow(2).sum() for p in self.params if p.grad is not None),
                   torch.zeros((), dtype=torch.float64, device=self.device))

    # -- the update -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        lo, hi = self.lo, self.hi
        p = self._flat([p.data for p in self.params])[lo:hi]
        g = self.flat_grads()[lo:hi]
        if grad_scale != 1.0:
            g = g * grad_scale
        # decoupled weight decay on the slice that holds matrices
        d = max(min(self.decay_end, hi) - lo, 0)
        if self.weight_decay and d:
            p[:d].mul_(1 - lr * self.weight_decay)
        self.exp_avg.lerp_(g, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1 = 1 - b1 ** self.step_count
        bias2 = 1 - b2 ** self.step_count
        denom = (self.exp_avg_sq / bias2).sqrt_().add_(self.eps)
        p.addcdiv_(self.exp_avg, denom, value=-lr / bias1)
        self._write_back(p)

    def _write_back(self, shard: torch.Tensor) -> None:
        if self.world > 1:
            padded = torch.zeros(self.shard, dtype=torch.float32, device=self.device)
            padded[: shard.numel()] = shard
            parts = [torch.empty_like(padded) for _ in range(self.world)]
            dist.all_gather(parts, padded, group=self.group)
            flat = torch.cat(parts)[: self.numel]
        else:
            flat = shard
        offset = 0
        for prm in self.params:
            k = prm.numel()
            prm.data.copy_(flat[offset:offset + k].view_as(prm))
            offset += k

    # -- state, keyed by parameter name so any layout can load it ---------------------------------
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        padded = torch.zeros(self.shard, dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[: self.numel]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) moments per parameter name; collective when sharded."""
        out = {}
        for key, t in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            flat, offset = self._gather(t), 0
            for name, prm in zip(self.names, self.params):
                out[f"{name}.{key}"] = flat[offset:offset + prm.numel()].view_as(prm).cpu().clone()
                offset += prm.numel()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        self.step_count = step
        for key, dst in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            missing = [n for n in self.names if f"{n}.{key}" not in tensors]
            if missing:
                raise KeyError(f"optimizer state lacks {key} for {missing[:3]}{'...' if len(missing) > 3 else ''}")
            flat = self._flat([tensors[f"{n}.{key}"] for n in self.names])
            dst.copy_(flat[self.lo:self.hi])

    def memory_bytes(self) -> int:
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * 4
