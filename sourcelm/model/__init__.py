"""The single-device DeepSeek-V3 model (MLA, DeepSeekMoE, MTP) and its initialisation."""

from sourcelm.model.init import init_expert_slice, init_weights
from sourcelm.model.moe import MoE, RoutedExperts, Router
from sourcelm.model.transformer import DeepseekV3, ModelOutput


def build_model(cfg, seed: int | None = 0, device=None):
    """A DeepseekV3 for `cfg`, initialised from `seed` (None: left uninitialised, e.g. before loading)."""
    import torch

    with torch.device(device or "cpu"):
        model = DeepseekV3(cfg)
    if seed is not None and not (device is not None and torch.device(device).type == "meta"):
        init_weights(model, seed)
    return model


__all__ = ["DeepseekV3", "ModelOutput", "MoE", "RoutedExperts", "Router", "build_model", "init_expert_slice",
           "init_weights"]
