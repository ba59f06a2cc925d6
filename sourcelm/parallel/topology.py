"""Process topology: world = nodes x ranks_per_node, and the process groups built on it.

Ranks are numbered node-major: rank r sits on node r // ranks_per_node at local index
r % ranks_per_node (DeepEP's convention, report §3.1). On one machine `ranks_per_node` splits the
local processes into pretend nodes, so the cross-node code paths run and are tested on a laptop.

Pipeline parallelism is the outermost dimension: with `pp` stages, pipeline rank s holds the ranks
[s * S, (s + 1) * S) (S = world / pp, the stage's ranks: whole nodes, or one node's share); inside a stage
the ranks are expert and data parallel exactly as a whole world is without pipelining (the report's PP 16 x
EP 64 x ZeRO-1 DP: 128 GPUs per stage).

Groups (every rank builds every group, in the same order, as torch.distributed requires):
  ep             `ep` contiguous ranks sharing the routed experts of a layer (expert parallel)
  dp             the ranks of this stage: data parallel for the non-expert parameters (ZeRO-1 shards
                 over it); all ranks without pipelining
  expert_replica ranks of this stage holding the same experts (same position in different EP groups);
                 expert gradients are reduced over it
  pp             the ranks at this position in every stage, one per stage: the pipeline's p2p peers
  intra_node     the ranks of this node
  inter_node     the ranks at this local index on every node
  ep_intra       the ranks of this EP group on this node (the NVLink hop of two-hop dispatch)
  ep_inter       the ranks of this EP group at this local index, one per node (the IB hop)

Backward lane (`build_topology(backward_lane=True)`, for DualPipeV's F&B pairs): a second group of each kind
that the pipeline's pairs use (pp, ep, ep_intra, ep_inter), with the same members. Collectives issued by backward
computation run on it, those of forward computation on the first, so that one micro-batch's backward can run at
the same time as another's forward without their messages ever meeting on one group (a group's collectives must
be issued in the same order on every member; two threads on one group would race for that order).

Inside an EP group, position p (`ep_rank`) holds global experts [p * E_local, (p + 1) * E_local); the
group's nodes are numbered 0..ep_nodes-1 and position p lies on EP node p // ep_local.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.distributed as dist

from sourcelm.config import ConfigError, divisors


@dataclass(frozen=True)
class Layout:
    """The pure arithmetic of a layout (no process groups), validated at construction."""

    world: int
    ranks_per_node: int
    ep: int
    n_routed_experts: int
    n_group: int = 1  # router groups; mapped onto the nodes an EP group spans
    topk_group: int = 1
    pp: int = 1  # pipeline stages (pipeline ranks)

    def __post_init__(self):
        validate_layout(self.world, self.ranks_per_node, self.ep, self.n_routed_experts, self.n_group, self.pp)

    @property
    def stage_world(self) -> int:
        """Ranks per pipeline stage: the data-parallel world of the dense parameters."""
        return self.world // self.pp

    @property
    def nodes(self) -> int:
        return self.world // self.ranks_per_node

    @property
    def ep_local(self) -> int:
        """Ranks of one EP group on one node."""
        return min(self.ep, self.ranks_per_node)

    @property
    def ep_nodes(self) -> int:
        """Nodes one EP group spans."""
        return self.ep // self.ep_local

    @property
    def experts_per_rank(self) -> int:
        return self.n_routed_experts // self.ep

    @property
    def max_nodes_per_token(self) -> int:
        """M of node-limited routing: the router keeps topk_group groups, each inside one node
        (n_group = 1 means plain top-k: a token may reach every node)."""
        return self.ep_nodes if self.n_group == 1 else min(self.topk_group, self.ep_nodes)

    def ep_node_of_expert(self, expert):
        """EP-node index (0..ep_nodes-1) of a global expert id (int or int tensor)."""
        return (expert // self.experts_per_rank) // self.ep_local


def validate_layout(world: int, ranks_per_node: int, ep: int, n_routed_experts: int, n_group: int = 1,
                    pp: int = 1) -> None:
    """Raises ConfigError naming the field and the fix when the layout cannot work."""
    if world <= 0:
        raise ConfigError(f"world size {world} must be positive")
    if pp <= 0 or world % pp:
        raise ConfigError(f"parallel.pp = {pp} must divide the world size {world} (PP x EP x DP = world); choose "
                          f"among {divisors(world)} or launch a multiple of {pp} processes")
    stage = world // pp
    if pp > 1 and stage % ranks_per_node and ranks_per_node % stage:
        raise ConfigError(f"parallel.pp = {pp} gives pipeline stages of {stage} ranks, which neither fill whole nodes "
                          f"of parallel.ranks_per_node = {ranks_per_node} nor divide one; make world / pp a multiple "
                          f"or a divisor of ranks_per_node")
    if pp > 1 and stage % ep:
        raise ConfigError(f"parallel.ep = {ep} must divide the {stage} ranks of a pipeline stage (world {world} / "
                          f"parallel.pp {pp}); choose parallel.ep among "
                          f"{[d for d in divisors(stage) if n_routed_experts % d == 0]}")
    if ranks_per_node <= 0 or world % ranks_per_node:
        raise ConfigError(
            f"parallel.ranks_per_node = {ranks_per_node} must divide the world size {world}; "
            f"choose among {divisors(world)} (or launch a multiple of it)")
    if ep <= 0 or n_routed_experts % ep:
        raise ConfigError(
            f"parallel.ep = {ep} must divide model.n_routed_experts = {n_routed_experts}; "
            f"choose among {divisors(n_routed_experts)}")
    if world % ep:
        raise ConfigError(
            f"parallel.ep = {ep} must divide the world size {world}; choose among "
            f"{[d for d in divisors(world) if n_routed_experts % d == 0]} or launch a multiple of {ep} processes")
    if ep % ranks_per_node and ranks_per_node % ep:
        raise ConfigError(
            f"parallel.ep = {ep} and parallel.ranks_per_node = {ranks_per_node}: an EP group must fill whole "
            f"nodes or fit inside one; make ep a multiple or a divisor of ranks_per_node")
    ep_nodes = ep // min(ep, ranks_per_node)
    if n_group > 1 and n_group % ep_nodes:  # n_group = 1: plain top-k, no node limit to keep
        raise ConfigError(
            f"model.n_group = {n_group} must be a multiple of the {ep_nodes} nodes an EP group spans "
            f"(ep = {ep}, ranks_per_node = {ranks_per_node}) so that every router group lies inside one node "
            f"and topk_group bounds the nodes per token; set model.n_group to a multiple of {ep_nodes} or "
            f"change parallel.ep / parallel.ranks_per_node")


def resolve_ranks_per_node(ranks_per_node: int, world: int) -> int:
    """0 means the real node size, from the launcher's LOCAL_WORLD_SIZE (all ranks if it is unset)."""
    if ranks_per_node:
        return ranks_per_node
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


def _new_groups(partition: list[list[int]], rank: int):
    """Creates one group per block of `partition` (on every rank, same order); returns this rank's."""
    mine = None
    for ranks in partition:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    return mine


@dataclass
class Topology:
    """This rank's place in the layout and its process groups. Build it with `build_topology`."""

    layout: Layout
    rank: int
    groups: dict = field(default_factory=dict)  # kind -> ProcessGroup
    backward_groups: dict = field(default_factory=dict)  # kind -> the backward lane's twin (module docstring)
    members: dict = field(default_factory=dict)  # kind -> global ranks of this rank's group, in group order

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def ranks_per_node(self) -> int:
        return self.layout.ranks_per_node

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.ranks_per_node

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def ep_index(self) -> int:
        """Which EP group this rank belongs to."""
        return self.rank // self.ep

    @property
    def ep_rank(self) -> int:
        """Position inside the EP group; it decides which experts this rank holds."""
        return self.rank % self.ep

    @property
    def ep_node(self) -> int:
        return self.ep_rank // self.layout.ep_local

    @property
    def ep_local_rank(self) -> int:
        return self.ep_rank % self.layout.ep_local

    @property
    def stage(self) -> int:
        """Pipeline rank: which stage this rank belongs to."""
        return self.rank // self.layout.stage_world

    @property
    def stage_rank(self) -> int:
        """Position inside the stage: the data-parallel rank, and the p2p peer's position in the next stage."""
        return self.rank % self.layout.stage_world

    def rank_of_stage(self, stage: int) -> int:
        """The global rank at this rank's position in pipeline stage `stage`."""
        return stage * self.layout.stage_world + self.stage_rank

    @property
    def local_experts(self) -> range:
        e = self.layout.experts_per_rank
        return range(self.ep_rank * e, (self.ep_rank + 1) * e)

    def group(self, kind: str, backward: bool = False):
        """This rank's group of `kind`; backward=True: its backward-lane twin where one was built, else itself."""
        return self.backward_groups.get(kind, self.groups[kind]) if backward else self.groups[kind]

    def describe(self) -> str:
        lay = self.layout
        return (f"rank {self.rank}/{lay.world}: node {self.node}/{lay.nodes} local {self.local_rank}; "
                f"EP group {self.ep_index} position {self.ep_rank}/{lay.ep} (spans {lay.ep_nodes} node(s)), "
                f"experts [{self.local_experts.start}, {self.local_experts.stop})")


def partitions(layout: Layout) -> dict[str, list[list[int]]]:
    """Every group kind as a partition of the ranks (pure; used by build_topology and its tests)."""
    w, rpn, ep, el = layout.world, layout.ranks_per_node, layout.ep, layout.ep_local
    s = layout.stage_world
    ep_groups = [list(range(g * ep, (g + 1) * ep)) for g in range(w // ep)]  # contiguous: never across stages
    stages = [range(k * s, (k + 1) * s) for k in range(layout.pp)]
    return {
        "ep": ep_groups,
        "dp": [list(stage) for stage in stages],
        "expert_replica": [list(range(stage.start + p, stage.stop, ep)) for stage in stages for p in range(ep)],
        "pp": [list(range(i, w, s)) for i in range(s)],
        "intra_node": [list(range(n * rpn, (n + 1) * rpn)) for n in range(layout.nodes)],
        "inter_node": [list(range(i, w, rpn)) for i in range(rpn)],
        "ep_intra": [g[j * el:(j + 1) * el] for g in ep_groups for j in range(layout.ep_nodes)],
        "ep_inter": [g[i::el] for g in ep_groups for i in range(el)],
    }


BACKWARD_LANE_KINDS = ("pp", "ep", "ep_intra", "ep_inter")


def build_topology(ep: int, ranks_per_node: int, n_routed_experts: int, n_group: int = 1,
                   topk_group: int = 1, pp: int = 1, backward_lane: bool = False) -> Topology:
    """Validates the layout for the current process group and creates every group on every rank (and the backward
    lane's twins of BACKWARD_LANE_KINDS with backward_lane=True).

    Without an initialised process group (one process) it returns a world-of-one topology whose
    groups are all None."""
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    layout = Layout(world, resolve_ranks_per_node(ranks_per_node, world), ep, n_routed_experts, n_group, topk_group,
                    pp)
    topo = Topology(layout, rank)
    for kind, parts in partitions(layout).items():
        if world == 1:
            topo.groups[kind], topo.members[kind] = None, [0]
            continue
        if kind == "dp" and layout.pp == 1:
            topo.groups[kind], topo.members[kind] = dist.group.WORLD, list(range(world))
            continue
        topo.groups[kind], topo.members[kind] = _new_groups(parts, rank)
    if backward_lane and world > 1:
        parts = partitions(layout)
        for kind in BACKWARD_LANE_KINDS:
            topo.backward_groups[kind] = _new_groups(parts[kind], rank)[0]
    return topo
