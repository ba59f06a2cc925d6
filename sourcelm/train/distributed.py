"""The training loop's view of a multi-process layout (expert + data parallel, ZeRO-1), built from `sourcelm.parallel`.

Implements the interface of `sourcelm.train.context.SingleProcess` with collectives:
- every rank builds the same full model from the seed, then keeps only its experts
  (`apply_expert_parallel`), so initialisation is layout-independent;
- the global batch is split over all ranks (data parallel); dense gradients are summed over all
  ranks, expert gradients over the ranks holding the same experts (the loop already scaled the
  loss by 1 / ranks, so sums are the gradient of the global mean loss);
- dense optimizer state is sharded over all ranks (ZeRO-1, `FlatAdamW(group=...)`); expert
  optimizer state lives with the experts (already sharded by EP);
- checkpoints hold full tensors under global names (experts gathered over the EP group, moments
  likewise), so any layout resumes from any other.
Gradients live in the optimizers' flat buffers, in a fixed parameter order, so reductions are deterministic run to
run for a given layout.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from sourcelm.parallel.experts import (
    apply_expert_parallel,
    expert_shards,
    gather_expert_state,
    gather_over_ep,
    load_expert_state,
    topology_from_config,
)
from sourcelm.train.executor import MicroBatchLoop
from sourcelm.train.optim import FlatAdamW


class DistributedContext:
    def __init__(self, cfg, ranks_per_node: int = 0):
        use_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
        # NCCL reduces device tensors only; host-side counters travel on this device
        self.comm_device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda
                            else torch.device("cpu"))
        if not dist.is_initialized():
            if use_cuda:  # one GPU per local rank, as torchrun numbers them
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if use_cuda else "gloo")
        if ranks_per_node:
            cfg.parallel.ranks_per_node = ranks_per_node
        self.cfg = cfg
        self.topo = topology_from_config(cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp_rank, self.dp_world = self.rank, self.world
        self.is_main = self.rank == 0
        self.zero_group = self.topo.groups["dp"]
        lay = self.topo.layout
        self.description = (f"{lay.world} processes = {lay.nodes} node(s) x {lay.ranks_per_node}, EP {lay.ep} "
                            f"({lay.experts_per_rank} experts per rank), {cfg.parallel.dispatcher} dispatch, "
                            f"ZeRO-1 {'on' if cfg.parallel.zero1 else 'off'}")
        self.launch = {"nproc": lay.world, "ranks_per_node": lay.ranks_per_node}
        self.dispatcher = None
        self.shards = {}

    def prepare_model(self, model: nn.Module) -> nn.Module:
        self.dispatcher = apply_expert_parallel(model, self.topo, self.cfg.parallel.dispatcher)
        self.shards = expert_shards(model)
        return model

    def executor(self) -> MicroBatchLoop:
        """Every rank holds every layer: the plain micro-batch loop (the all-to-all runs inside the MoE layers)."""
        return MicroBatchLoop()

    def is_expert_param(self, name: str) -> bool:
        return name in self.shards

    def reduce_gradients(self, dense: FlatAdamW, experts: FlatAdamW) -> None:
        # the optimizers' flat gradient buffers: one collective each, in a fixed parameter order
        dist.all_reduce(dense.fold_grads(), group=self.topo.groups["dp"])
        replica = self.topo.groups["expert_replica"]
        if replica is not None and len(self.topo.members["expert_replica"]) > 1:
            dist.all_reduce(experts.fold_grads(), group=replica)

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def expert_sq_sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if self.topo.groups["ep"] is not None:
            dist.all_reduce(t, group=self.topo.groups["ep"])
        return t

    # -- checkpoints: full tensors, global names --------------------------------------------------
    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in self.shards}
        state.update(gather_expert_state(model, self.topo))
        return state

    def load_model_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        dense = {k: v for k, v in tensors.items() if k not in self.shards}
        missing, unexpected = model.load_state_dict(dense, strict=False)
        missing = [k for k in missing if k not in self.shards]
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        load_expert_state(model, tensors)

    def _expert_moment_names(self):
        for name in self.shards:
            for key in ("exp_avg", "exp_avg_sq"):
                yield name, f"{name}.{key}"

    def full_optimizer_state(self, dense_state: dict, expert_state: dict) -> dict[str, torch.Tensor]:
        out = dict(dense_state)
        for _, key in self._expert_moment_names():
            out[key] = gather_over_ep(expert_state[key], self.topo)
        return out

    def local_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, key in self._expert_moment_names():
            shard = self.shards[name]
            out[key] = tensors[key][shard.start:shard.stop]
        return out

    def barrier(self) -> None:
        dist.barrier()

    def stats(self) -> dict:
        counts = self.dispatcher.stats.reset() if self.dispatcher is not None else {}
        if not counts:
            return {}
        keys = sorted(counts)
        total = self.sum_tensor(torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=self.comm_device))
        return {f"a2a_{k}": int(v) for k, v in zip(keys, total.tolist())}
