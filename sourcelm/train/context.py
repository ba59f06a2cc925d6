"""What the training loop needs to know about the process layout.

The loop is written once, against this small interface. `SingleProcess` is the trivial layout;
`sourcelm.train.distributed.DistributedContext` implements the same methods with collectives over
the expert-parallel, data-parallel and expert-replica groups. Gradients are summed (not averaged)
across ranks because every rank scales its loss by 1 / data-parallel ranks before backward: summing
then yields exactly the gradient of the global-batch mean loss, for dense parameters (replicated on
all ranks) and for experts (which see tokens from every rank of their EP group) alike.
"""

from __future__ import annotations

import torch
from torch import nn

from sourcelm.train.executor import MicroBatchLoop
from sourcelm.train.optim import FlatAdamW


class SingleProcess:
    rank = 0
    world = 1
    dp_rank = 0
    dp_world = 1  # ranks over which the global batch is split
    is_main = True
    zero_group = None  # process group over which dense optimizer state is sharded
    description = "1 process"

    @property
    def launch(self) -> dict:
        """How to start this layout again (verify --replay): processes, ranks per node, and the intra-op threads per
        rank, because the bits of torch's weight-gradient matmuls and embedding backward depend on the thread
        count (tests/provenance/test_verify_layouts.py)."""
        return {"nproc": 1, "ranks_per_node": 1, "threads": torch.get_num_threads()}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Returns the model this rank trains (expert-parallel layouts swap in sharded experts)."""
        return model

    def executor(self) -> MicroBatchLoop:
        """What runs one step's micro-batches on this layout (`executor.py`)."""
        return MicroBatchLoop()

    def is_expert_param(self, name: str) -> bool:
        return ".mlp.experts." in name

    def reduce_gradients(self, dense: FlatAdamW, experts: FlatAdamW) -> None:
        """Sums, in place, the gradients of the dense and the expert parameters (their optimizers' flat
        buffers, `FlatAdamW.fold_grads`) over the ranks that hold them."""

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over all ranks (expert counts, loss sums)."""
        return t

    def global_grad_sq(self, dense: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Σ g² over the whole model from this rank's dense and expert sums (for the global gradient norm)."""
        return dense + experts

    def moe_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every MoE layer of the model, in order, for the load balancer."""
        return model.moe_layers()

    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensors under their global names (experts gathered from every EP rank)."""
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def load_model_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(tensors, strict=True)

    def full_optimizer_state(self, dense_state: dict, expert_state: dict) -> dict[str, torch.Tensor]:
        return {**dense_state, **expert_state}

    def local_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The subset (and slices) of a global optimizer state this rank's optimizers load."""
        return tensors

    def barrier(self) -> None:
        pass

    def per_rank(self, figures: dict[str, float]) -> dict[str, list[float]]:
        """Each figure as a list over the ranks."""
        return {k: [float(v)] for k, v in figures.items()}

    def stats(self) -> dict:
        """Communication counters since the last call (bytes per link class)."""
        return {}
