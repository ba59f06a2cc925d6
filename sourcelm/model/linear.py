"""The model's projections: `nn.Linear` (same parameters, names and init) whose matmul is `ops.linear`, the one
place where the precision of the linear layers is chosen (BF16/FP32 by autocast, FP8 by `train.fp8`).

The report keeps the embedding, the output head, the MoE gate, the norms and the attention core out of FP8
(§3.3.1): those are not this module (the head's matmul is the fused loss's, the gate's is an fp32 `F.linear`).
Attention's `o_proj` is this module, but its matmul runs with the attention core as one op
(`ops.attention_output`), so that FP8 can keep the core's output once for both backward passes that read it.
"""

from __future__ import annotations

import torch
from torch import nn

from sourcelm.kernels import ops


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)
