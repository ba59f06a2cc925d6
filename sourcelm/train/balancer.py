"""Auxiliary-loss-free load balancing (report §2.1.2).

Each MoE layer's router carries a per-expert bias b (fp32, not trained by gradient) that is added
to the affinities for expert *selection* only. After every optimizer step the bias moves against
the load observed on the whole global batch of that step:

    b_i += γ · sign(mean_load − load_i)

so overloaded experts become less attractive and underloaded ones more. γ follows its schedule
(0.001, then 0 for the end of the run). The counts come from the forward passes only (the model
returns them as tensors), so activation recomputation cannot count a token twice, and they exclude
padding. Under data/expert parallelism the caller sums them over all ranks before `update`, so
every rank applies the identical change and the biases never diverge.
"""

from __future__ import annotations

import torch
from torch import nn


class LoadBalancer:
    def __init__(self, moe_layers: list[tuple[str, nn.Module]]):
        self.names = [name for name, _ in moe_layers]
        # the bias buffers live in the routers, so checkpoints and HF export carry them
        self.biases = [moe.gate.e_score_correction_bias for _, moe in moe_layers]
        n_experts = {b.numel() for b in self.biases}
        self.num_experts = n_experts.pop() if len(n_experts) == 1 else 0
        self.pending = None  # counts accumulated over the micro-batches of the current step

    def accumulate(self, counts: torch.Tensor) -> None:
        """Adds one micro-batch's per-layer expert counts [L, E]."""
        counts = counts.detach().to(torch.int64)
        self.pending = counts.clone() if self.pending is None else self.pending + counts

    def take(self) -> torch.Tensor:
        """The counts of the step so far, and a fresh accumulator."""
        counts = self.pending if self.pending is not None else torch.zeros(
            len(self.biases), self.num_experts, dtype=torch.int64, device=self.biases[0].device)
        self.pending = None
        return counts

    @torch.no_grad()
    def update(self, counts: torch.Tensor, gamma: float) -> dict:
        """Applies the sign rule with the global-batch counts [L, E]; returns per-layer statistics
        computed from those counts (before the update moves the biases)."""
        stats = load_statistics(counts)
        if gamma:
            load = counts.to(torch.float32)
            step = gamma * torch.sign(load.mean(dim=1, keepdim=True) - load)
            for bias, delta in zip(self.biases, step):
                bias.add_(delta.to(bias.dtype))
        stats["bias_norm"] = [float(b.norm()) for b in self.biases]
        return stats


def load_statistics(counts: torch.Tensor) -> dict:
    """Per layer: max violation (max load / mean load − 1, the report's balance measure) and the
    coefficient of variation of the load."""
    load = counts.to(torch.float64)
    mean = load.mean(dim=1).clamp_min(1e-12)
    return {
        "max_violation": (load.max(dim=1).values / mean - 1).tolist(),
        "load_cv": (load.std(dim=1, unbiased=False) / mean).tolist(),
    }
