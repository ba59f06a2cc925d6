"""The training loop's view of a multi-process layout (pipeline + expert + data parallel, ZeRO-1), built from
`sourcelm.parallel`.

Implements the interface of `sourcelm.train.context.SingleProcess` with collectives:
- every rank builds the same full model from the seed, then keeps only its pipeline chunks
  (`pipeline.prune_to_chunks`, with `parallel.pp` > 1) and its experts (`apply_expert_parallel`), so
  initialisation is layout-independent;
- the global batch is split over the ranks of a pipeline stage (data parallel; all ranks without a
  pipeline); dense gradients are summed over those ranks, expert gradients over the stage's ranks holding
  the same experts (the loop already scaled the loss by 1 / ranks, so sums are the gradient of the global
  mean loss); the gradient norm sums over the pipeline ranks too;
- dense optimizer state is sharded over the stage's ranks (ZeRO-1, `FlatAdamW(group=...)`); expert
  optimizer state lives with the experts (already sharded by EP);
- checkpoints hold full tensors under global names (experts gathered over the EP group, moments
  likewise, stages gathered to rank 0), so any layout resumes from any other. The routers' expert biases
  of every layer are kept on every rank (a few floats each), updated alike from the global counts.
Gradients live in the optimizers' flat buffers, in a fixed parameter order, so reductions are deterministic run to
run for a given layout.
"""

from __future__ import annotations

import logging
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
from sourcelm.parallel.pipeline_plan import describe_partition, partition_layers, rank_chunks
from sourcelm.train.executor import MicroBatchLoop
from sourcelm.train.optim import FlatAdamW
from sourcelm.train.pipeline import PipelineExecutor, prune_to_chunks

log = logging.getLogger("sourcelm.train")


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
        self.dp_rank, self.dp_world = self.topo.stage_rank, self.topo.layout.stage_world
        self.is_main = self.rank == 0
        self.zero_group = self.topo.groups["dp"]
        lay, par = self.topo.layout, cfg.parallel
        self.pp = lay.pp
        pipeline = f"PP {lay.pp} ({par.pp_schedule}) x " if lay.pp > 1 else ""
        self.description = (f"{lay.world} processes = {lay.nodes} node(s) x {lay.ranks_per_node}, {pipeline}"
                            f"EP {lay.ep} ({lay.experts_per_rank} experts per rank), {par.dispatcher} dispatch, "
                            f"ZeRO-1 {'on' if par.zero1 else 'off'}")
        self.launch = {"nproc": lay.world, "ranks_per_node": lay.ranks_per_node, "threads": torch.get_num_threads()}
        self.dispatcher = None
        self.shards = {}
        self.ranges = (partition_layers(cfg.model, lay.pp, par.pp_schedule, cfg.data.seq_len, par.pp_layers)
                       if lay.pp > 1 else None)
        self.remote_biases: dict[str, torch.Tensor] = {}  # expert biases of the MoE layers other stages hold

    def prepare_model(self, model: nn.Module) -> nn.Module:
        par = self.cfg.parallel
        if self.pp > 1:
            self.moe_names = [name for name, _ in model.moe_layers()]
            prune_to_chunks(model, self.ranges, rank_chunks(self.topo.stage, self.pp, par.pp_schedule))
            here = {name for name, _ in model.moe_layers()}
            self.remote_biases = {name: torch.zeros(self.cfg.model.n_routed_experts, device=self.comm_device)
                                  for name in self.moe_names if name not in here}
            if self.is_main:
                log.info("pipeline: %s", describe_partition(self.cfg.model, self.ranges, self.pp, par.pp_schedule,
                                                            self.cfg.data.seq_len))
        self.dispatcher = apply_expert_parallel(model, self.topo, par.dispatcher, par.dispatch_chunk_rows or None)
        self.shards = expert_shards(model)
        return model

    def executor(self) -> MicroBatchLoop | PipelineExecutor:
        """Without a pipeline every rank holds every layer: the plain micro-batch loop (the all-to-all runs inside the
        MoE layers); with one, the pipeline schedule."""
        if self.pp == 1:
            return MicroBatchLoop()
        shape = (self.cfg.schedule.micro_batch, self.cfg.data.seq_len, self.cfg.model.hidden_size)
        return PipelineExecutor(self.topo, self.cfg.model, self.ranges, self.cfg.parallel.pp_schedule, shape,
                                self.comm_device, overlap=self.cfg.parallel.pp_overlap,
                                zero_bubble=self.cfg.parallel.pp_zero_bubble,
                                link_stats=self.dispatcher.stats if self.dispatcher is not None else None)

    def moe_layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every MoE layer of the model, in order, for the load balancer: those another stage holds as stand-ins that
        carry only their expert bias."""
        if self.pp == 1:
            return model.moe_layers()
        here = dict(model.moe_layers())
        return [(n, here[n] if n in here else _BiasOnly(self.remote_biases[n])) for n in self.moe_names]

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

    def global_grad_sq(self, dense: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Σ g² over every parameter of the model: the dense parameters' (whole on every rank of a stage) plus the
        experts' (summed over the EP group), summed over the pipeline stages."""
        total = experts.clone()
        if self.topo.groups["ep"] is not None:
            dist.all_reduce(total, group=self.topo.groups["ep"])
        total = total + dense
        if self.pp > 1:
            dist.all_reduce(total, group=self.topo.groups["pp"])
        return total

    # -- checkpoints: full tensors, global names --------------------------------------------------
    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in self.shards}
        state.update(gather_expert_state(model, self.topo))
        return self._gather_stages(state)

    def _gather_stages(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every stage's tensors on rank 0 (over the pipeline group of stage position 0; the other positions hold the
        same tensors). Collective over that group; other ranks get their own stage's."""
        if self.pp == 1 or self.topo.stage_rank != 0:
            return state
        parts = [None] * self.pp if self.is_main else None
        dist.gather_object({k: v.cpu() for k, v in state.items()}, parts, dst=0, group=self.topo.groups["pp"])
        return {k: v for part in parts for k, v in part.items()} if self.is_main else state

    def load_model_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        own = model.state_dict()
        dense = {k: v for k, v in tensors.items() if k not in self.shards and (self.pp == 1 or k in own)}
        missing, unexpected = model.load_state_dict(dense, strict=False)
        missing = [k for k in missing if k not in self.shards]
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        load_expert_state(model, tensors)
        for name, bias in self.remote_biases.items():
            bias.copy_(tensors[f"{name}.gate.e_score_correction_bias"])

    def _expert_moment_names(self):
        for name in self.shards:
            for key in ("exp_avg", "exp_avg_sq"):
                yield name, f"{name}.{key}"

    def full_optimizer_state(self, dense_state: dict, expert_state: dict) -> dict[str, torch.Tensor]:
        out = dict(dense_state)
        for _, key in self._expert_moment_names():
            out[key] = gather_over_ep(expert_state[key], self.topo)
        return self._gather_stages(out)

    def local_optimizer_state(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        for name, key in self._expert_moment_names():
            shard = self.shards[name]
            out[key] = tensors[key][shard.start:shard.stop]
        return out

    def barrier(self) -> None:
        dist.barrier()

    def per_rank(self, figures: dict[str, float]) -> dict[str, list[float]]:
        """Each figure as a list over the ranks, in rank order (collective; every rank passes the same keys)."""
        if not figures:
            return {}
        keys = sorted(figures)
        mine = torch.tensor([float(figures[k]) for k in keys], dtype=torch.float64, device=self.comm_device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        return {k: [float(t[i]) for t in everyone] for i, k in enumerate(keys)}

    def stats(self) -> dict:
        counts = self.dispatcher.stats.reset() if self.dispatcher is not None else {}
        if not counts:
            return {}
        keys = sorted(counts)
        total = self.sum_tensor(torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=self.comm_device))
        return {f"a2a_{k}": int(v) for k, v in zip(keys, total.tolist())}


class _BiasOnly(nn.Module):
    """Stands in, for the load balancer, for an MoE layer another pipeline stage holds: only its expert bias."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.gate = nn.Module()
        self.gate.e_score_correction_bias = bias
