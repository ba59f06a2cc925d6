"""The optimizer's CPU kernels: a blockwise fused AdamW update (`csrc/adamw.c`, optionally writing a bf16
compute copy of the weights and reading bf16 gradients) and a thread-count-independent sum of squares.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sourcelm.kernels.build import checked, library


class AdamWBlocks:
    """The blocks of one optimizer's flat buffers, laid out once for `adamw_blocks` (`csrc/adamw.c`): each
    a slice of the fp32 weights, of the two moments (fp32, or bf16 in every block) and optionally of the bf16
    compute copy, and of one gradient, which `step` takes fresh each time (backward makes new ones)."""

    FIELDS = 9  # p, g, m, v, copy, n, grad is bf16, decayed, moments are bf16

    def __init__(self, params: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
                 copies: list[torch.Tensor | None], decayed: list[bool]):
        moment_dtype = exp_avg[0].dtype if exp_avg else torch.float32
        if moment_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"adamw_blocks keeps moments in fp32 or bf16, not {moment_dtype}")
        for tensors, dtype in ((params, torch.float32), ([*exp_avg, *exp_avg_sq], moment_dtype)):
            for t in tensors:
                if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
                    raise ValueError("adamw_blocks takes contiguous CPU fp32 weights and moments all fp32 or all bf16")
        self.desc = np.zeros((len(params), self.FIELDS), dtype=np.int64)
        for i, (p, m, v, c, d) in enumerate(zip(params, exp_avg, exp_avg_sq, copies, decayed)):
            if m.numel() != p.numel() or v.numel() != p.numel() or (c is not None and (
                    c.numel() != p.numel() or c.dtype != torch.bfloat16 or not c.is_contiguous())):
                raise ValueError("adamw_blocks: a block's moments and copy must match its weights")
            self.desc[i] = [p.data_ptr(), 0, m.data_ptr(), v.data_ptr(), 0 if c is None else c.data_ptr(),
                            p.numel(), 0, int(d), int(moment_dtype == torch.bfloat16)]
        self.numel = [p.numel() for p in params]

    def step(self, grads: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, step: int, grad_mult: float) -> None:
        """One AdamW step on every block from `grads` (one per block, fp32 or bf16, contiguous), times
        `grad_mult`; decay on the blocks marked decayed."""
        for i, (g, n) in enumerate(zip(grads, self.numel)):
            if g.numel() != n or g.dtype not in (torch.float32, torch.bfloat16) or not g.is_contiguous() \
                    or g.device.type != "cpu":
                raise ValueError(f"adamw_blocks: block {i} needs a contiguous fp32 or bf16 CPU gradient of {n} "
                                 f"elements")
            self.desc[i, 1] = g.data_ptr()
            self.desc[i, 6] = g.dtype == torch.bfloat16
        step_size = lr / (1.0 - beta1 ** step)  # in double, rounded once, as torch's fused kernel does
        bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
        library().adamw_blocks(self.desc.ctypes.data, len(self.numel), lr, beta1, beta2, eps, weight_decay,
                                step_size, bc2_sqrt, grad_mult)


def sum_squares(tensors: list[torch.Tensor]) -> float:
    """Σ x² over contiguous fp32 or bf16 CPU tensors, accumulated in fp64 (thread-count independent)."""
    for t in tensors:
        checked(t)
    desc = np.array([[t.data_ptr(), t.numel(), t.dtype == torch.bfloat16] for t in tensors], dtype=np.int64)
    total = library().sum_squares(desc.ctypes.data if len(tensors) else None, len(tensors))
    if total < 0:
        raise MemoryError("sum_squares could not allocate its partial sums")
    return total
