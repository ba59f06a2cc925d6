"""Layout-independent initialisation (DESIGN invariant 1).

Every parameter's initial values are a pure function of (seed, its global name): a CPU
`torch.Generator` is seeded from sha256(f"{seed}:{name}") and draws N(0, std^2) with
std = `initializer_range` (0.006, the report's). RMSNorm weights are 1; the expert-bias buffers 0.
A routed expert's slice is drawn from its own per-expert name
`{experts module}.{global expert id}.{w1|w2|w3}`, so a rank holding experts [a, b) of a layer
initialises them bit-identically to the single-process model, whatever the expert-parallel layout.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from sourcelm.model.moe import RoutedExperts, Router
from sourcelm.model.norm_rope import RMSNorm


def name_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _normal_(tensor: torch.Tensor, std: float, gen: torch.Generator) -> None:
    if tensor.is_meta:
        return
    with torch.no_grad():
        values = torch.randn(tensor.shape, generator=gen, dtype=torch.float32) * std
        tensor.copy_(values.to(tensor.dtype))


def init_expert_slice(tensor: torch.Tensor, seed: int, experts_name: str, global_expert_id: int, which: str,
                      std: float) -> None:
    """Fills `tensor` (one expert's [I, H] or [H, I] matrix) for expert `global_expert_id` of the routed
    experts module named `experts_name` (e.g. "model.layers.3.mlp.experts"); which is w1, w2 or w3."""
    _normal_(tensor, std, name_generator(seed, f"{experts_name}.{global_expert_id}.{which}"))


def init_weights(model: nn.Module, seed: int, std: float | None = None) -> None:
    """Initialises every parameter and the expert-bias buffers of `model` (a DeepseekV3) in place."""
    if std is None:
        std = model.config.initializer_range
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, RMSNorm):
            with torch.no_grad():
                module.weight.fill_(1.0)
        elif isinstance(module, Router):
            _normal_(module.weight, std, name_generator(seed, f"{prefix}weight"))
            with torch.no_grad():
                module.e_score_correction_bias.zero_()
        elif isinstance(module, RoutedExperts):
            # an expert-parallel subclass holding experts [offset, offset + local) sets `expert_offset`
            offset = getattr(module, "expert_offset", 0)
            for which in ("w1", "w2", "w3"):
                full = getattr(module, which)
                for e in range(full.shape[0]):
                    init_expert_slice(full[e], seed, mod_name, offset + e, which, std)
        else:
            for p_name, p in module.named_parameters(recurse=False):
                _normal_(p, std, name_generator(seed, f"{prefix}{p_name}"))
