"""Expert-parallel routed experts: each rank holds the experts of its EP position and exchanges tokens
with dispatch/combine. Applied from outside, so the model file stays single-device:

    topo = topology_from_config(cfg)                   # every rank, after init_process_group
    model = build_model(cfg.model, seed)               # the same full model on every rank
    dispatcher = apply_expert_parallel(model, topo, cfg.parallel.dispatcher)
    ...; dispatcher.stats.reset() -> {"inter_node_bytes": ..., "intra_node_bytes": ..., ...}

Parameter names do not change (`model.layers.3.mlp.experts.w1`), but the local tensor is the dim-0
slice [expert_offset, expert_offset + n_local) of the global one. `expert_shards` maps each local
parameter to (global name, slice, global shape), so checkpoints stay keyed by global expert ids;
`gather_expert_state` / `load_expert_state` convert between the local slices and full tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sourcelm.kernels import ops
from sourcelm.model.moe import RoutedExperts, grouped_experts_forward
from sourcelm.parallel.dispatch import Dispatcher, make_dispatcher
from sourcelm.parallel.topology import Topology, build_topology


class ExpertParallelExperts(RoutedExperts):
    """This rank's routed experts: w1/w3 [E_local, I, H], w2 [E_local, H, I] for global experts
    [expert_offset, expert_offset + E_local). Same forward signature as the single-device module."""

    def __init__(self, n_local: int, inter: int, hidden: int, dispatcher: Dispatcher, device=None, dtype=None):
        nn.Module.__init__(self)  # not RoutedExperts.__init__: it would allocate every expert
        topo = dispatcher.topo
        if n_local != topo.layout.experts_per_rank:
            raise ValueError(f"{n_local} local experts, but the topology gives {topo.layout.experts_per_rank} per rank")
        self.n_experts = topo.layout.n_routed_experts  # global count, as in the single-device module
        self.n_local = n_local
        self.expert_offset = topo.local_experts.start  # read by init_weights: layout-independent init
        self.impl = "expert_parallel"
        self.dispatcher = dispatcher
        kw = {"device": device, "dtype": dtype}
        self.w1 = nn.Parameter(torch.empty(n_local, inter, hidden, **kw))
        self.w3 = nn.Parameter(torch.empty(n_local, inter, hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(n_local, hidden, inter, **kw))

    @classmethod
    def from_full(cls, full: RoutedExperts, dispatcher: Dispatcher) -> ExpertParallelExperts:
        """The slice of a full (single-device) experts module that this rank holds."""
        e, inter, hidden = full.w1.shape
        if e != dispatcher.n_experts:
            raise ValueError(f"the model has {e} routed experts, the topology {dispatcher.n_experts}")
        mod = cls(dispatcher.e_local, inter, hidden, dispatcher, device=full.w1.device, dtype=full.w1.dtype)
        if not full.w1.is_meta:
            sl = slice(mod.expert_offset, mod.expert_offset + mod.n_local)
            with torch.no_grad():
                for which in ("w1", "w2", "w3"):
                    getattr(mod, which).copy_(getattr(full, which)[sl])
        return mod

    def extra_repr(self) -> str:
        return (f"experts [{self.expert_offset}, {self.expert_offset + self.n_local}) of {self.n_experts}, "
                f"dispatcher={self.dispatcher.kind}")

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                overlap: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, H], topk_idx [N, K] global ids, topk_weights [N, K] -> sum_k w_k expert_k(x) [N, H]
        (+ overlap(), computed while the first all-to-all of the dispatch is in flight). Under FP8 the tokens and
        the output's gradient travel to the experts as E4M3 tiles (`fp8_comm`)."""
        flight = self.dispatcher.dispatch_async(ops.routed_experts_input(x), topk_idx, topk_weights,
                                                fp8=ops.fp8_dispatch())
        extra = overlap() if overlap is not None else None
        recv_x, local_idx, recv_w, handle = flight.wait()
        out = ops.routed_experts_output(self.dispatcher.combine(self.local_forward(recv_x, local_idx, recv_w), handle))
        return out if extra is None else out + extra

    def local_forward(self, recv_x: torch.Tensor, local_idx: torch.Tensor, recv_w: torch.Tensor) -> torch.Tensor:
        """The received rows through their local experts (local_idx [N_recv, K], -1 for slots on other
        ranks), weighted and summed per row over the slots -> [N_recv, H], one row per received token."""
        return grouped_experts_forward(recv_x, local_idx, recv_w, self.w1, self.w2, self.w3)


def topology_from_config(cfg) -> Topology:
    """The topology for a validated `Config` (parallel.pp, parallel.ep, parallel.ranks_per_node, the router groups)."""
    m = cfg.model
    par = cfg.parallel
    return build_topology(par.ep, par.ranks_per_node, m.n_routed_experts, m.n_group, m.topk_group, par.pp,
                          backward_lane=par.pp > 1 and par.pp_schedule == "dualpipev" and par.pp_overlap)


def apply_expert_parallel(model: nn.Module, topo: Topology, dispatcher_kind: str = "two_hop",
                          chunk_rows: int | None = None) -> Dispatcher:
    """Replaces the routed experts of every MoE layer (main layers and MTP blocks) of a DeepseekV3 by
    this rank's slice, copied from the full experts (or left empty when they are on the meta device).
    Returns the one dispatcher all layers share; its `stats` count the bytes of every layer. chunk_rows: the
    chunked two-hop dispatcher's rows per chunk (None: measured at the start)."""
    cfg = model.config
    if (cfg.n_routed_experts, cfg.n_group) != (topo.layout.n_routed_experts, topo.layout.n_group):
        raise ValueError(f"topology built for {topo.layout.n_routed_experts} experts in {topo.layout.n_group} "
                         f"groups, model has {cfg.n_routed_experts} in {cfg.n_group}")
    dispatcher = make_dispatcher(dispatcher_kind, topo, chunk_rows)
    for _, moe in model.moe_layers():
        moe.experts = ExpertParallelExperts.from_full(moe.experts, dispatcher)
    return dispatcher


@dataclass(frozen=True)
class ExpertShard:
    global_name: str  # same as the local name: the parameter's name in the single-device model
    start: int  # dim-0 slice of the global tensor held here
    stop: int
    global_shape: tuple[int, ...]


def expert_shards(model: nn.Module) -> dict[str, ExpertShard]:
    """Local parameter name -> its place in the global tensor, for every expert-parallel parameter."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, ExpertParallelExperts):
            for which in ("w1", "w2", "w3"):
                p = getattr(mod, which)
                name = f"{mod_name}.{which}"
                out[name] = ExpertShard(name, mod.expert_offset, mod.expert_offset + mod.n_local,
                                        (mod.n_experts,) + tuple(p.shape[1:]))
    return out


def gather_expert_state(model: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """Full global tensors of every expert-parallel parameter, on every rank of the EP group
    (all-gathered in position order). The non-expert parameters are already whole on every rank."""
    params = dict(model.named_parameters())
    return {shard.global_name: gather_over_ep(params[name].detach(), topo)
            for name, shard in expert_shards(model).items()}


def gather_over_ep(local: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The full tensor whose dim-0 slices the EP group's ranks hold, concatenated in position order."""
    local = local.contiguous()
    if topo.groups["ep"] is None:
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(topo.ep)]
    dist.all_gather(parts, local, group=topo.groups["ep"])
    return torch.cat(parts)


def load_expert_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copies this rank's slices out of full global tensors (e.g. read from a checkpoint written at
    any layout) into the expert-parallel parameters."""
    params = dict(model.named_parameters())
    for name, shard in expert_shards(model).items():
        full = tensors[shard.global_name]
        if tuple(full.shape) != shard.global_shape:
            raise ValueError(f"{shard.global_name}: checkpoint shape {tuple(full.shape)}, "
                             f"expected {shard.global_shape}")
        with torch.no_grad():
            params[name].copy_(full[shard.start:shard.stop])
