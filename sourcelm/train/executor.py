"""How one optimizer step's micro-batches run: the seam between the training loop and the parallel layout.

The loop (`loop.py`) owns everything around a step (the batch schedule, reductions, clipping, the update,
the balancer); an executor owns the step's inside: the order in which micro-batches go forward and backward
through the model, and where each one's gradient and statistics land. The loop asks its context
(`SingleProcess`, `DistributedContext`) for one with `ctx.executor()`.

`MicroBatchLoop` is the executor of every layout in which each rank holds every layer (one process, expert and
data parallel): micro-batch by micro-batch, forward then backward, gradients folded into the optimizers' fp32
buffers between micro-batches. Expert parallelism needs nothing more here: its all-to-all and the overlap with
the shared expert happen inside the model's MoE layers. A pipeline schedule is an executor that runs each stage's
part of the model (`DeepseekV3.embed`, `blocks`, `head_and_losses`) in the order its schedule defines.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch


@dataclass
class LabelledBatch:
    """A micro-batch whose targets are given rather than the next tokens (SFT, `sft.py`): inputs [b, T], labels
    [b, T] (-100: no loss, e.g. the prompt), token_mask [b, T] (False: padding, left out of the expert counts)."""
    inputs: torch.Tensor
    labels: torch.Tensor
    token_mask: torch.Tensor

    def to(self, device) -> LabelledBatch:
        return LabelledBatch(self.inputs.to(device), self.labels.to(device), self.token_mask.to(device))


def model_inputs(batch: torch.Tensor | LabelledBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(inputs, labels, token_mask) of a micro-batch; token windows [b, T + 1] predict their own next tokens."""
    if isinstance(batch, LabelledBatch):
        return batch.inputs, batch.labels, batch.token_mask
    return batch[:, :-1], batch[:, 1:], None


@dataclass
class StepWork:
    """What the loop hands an executor for one optimizer step."""
    n_micro: int  # micro-batches in this step
    # micro-batch m -> this rank's token windows [b, T + 1] (or a LabelledBatch), on the device
    batch: Callable[[int], torch.Tensor | LabelledBatch]
    loss_scale: float  # 1 / (micro-batches × data-parallel ranks): summed gradients are the global mean's
    mtp_weight: float  # λ of this step
    compute: Callable[[], AbstractContextManager]  # the compute precision (autocast, compute copies, FP8)
    fold_grads: Callable[[], None]  # adds the gradients backward left into the optimizers' fp32 buffers


@dataclass
class StepResult:
    loss_parts: torch.Tensor  # fp64 [4]: loss, main, MTP, balance, each the scaled sum over this rank's micro-batches
    expert_counts: torch.Tensor  # int64 [MoE layers incl. MTP, E]: tokens routed to each expert on this rank


class MicroBatchLoop:
    """Every micro-batch through the whole model, one after another (module docstring)."""

    def run(self, model: torch.nn.Module, work: StepWork) -> StepResult:
        parts, counts = None, None
        for m in range(work.n_micro):
            inputs, labels, token_mask = model_inputs(work.batch(m))
            with work.compute():
                out = model(inputs, labels=labels, token_mask=token_mask, mtp_weight=work.mtp_weight,
                            return_logits=False)
            (out.loss * work.loss_scale).backward()
            if work.n_micro > 1:  # summed in fp32 (the compute copies' gradients are bf16)
                work.fold_grads()
            if parts is None:
                parts = torch.zeros(4, dtype=torch.float64, device=inputs.device)
            parts += torch.stack([out.loss.detach(), out.main_loss.detach(), out.mtp_loss.detach(),
                                  out.balance_loss.detach()]).double() * work.loss_scale
            counts = out.expert_counts if counts is None else counts + out.expert_counts
        return StepResult(parts, counts)

    def stats(self) -> dict[str, float]:
        """Per-rank figures of the last step (none here; the pipeline executor reports its timings)."""
        return {}

    @torch.no_grad()
    def final_hidden(self, model: torch.nn.Module, batch: torch.Tensor, compute) -> torch.Tensor:
        """The main stack's final-normed hidden states [b, T, H] of a batch [b, T + 1], forward only (no MTP)."""
        with compute():
            return model.hidden_states(batch[:, :-1])[0]
