"""Communication per step: dispatch/combine rows per link class, data-parallel reduction, pipeline sends.

Dispatch/combine (`dispatch_rows`) counts exactly what `sourcelm.parallel.dispatch` counts in its
`LinkStats`, as a function of the routing (each rank's topk_idx) and the layout:
  flat     a token row to every EP rank holding one of its experts; intra- or inter-node by the
           physical nodes of sender and receiver; the sender's own rank is free.
  two_hop  hop 1: a row to every EP node holding one of its experts, to the rank with the sender's
           local index there (inter-node); hop 2: the forwarder sends it on to the ranks of that
           node holding its experts (intra-node). Rows a rank keeps for itself cross no link.
Only hidden-state rows count (the routing metadata is left out, as in DeepEP's bandwidth figures).
A training step moves each row four times: dispatch, combine, and their two backwards (combine's
backward is a dispatch of the output gradient, dispatch's a combine of the input gradient), so the
bytes are rows x hidden x the four transfers' element bytes (`RowBytes`).

Without a measured routing the rows per token come from a sampled one (`sampled_routing`): the
model's own router on random inputs, i.e. the balanced routing the bias-based balancer aims at.

The report's node-limited routing argument (§3.2.2): a token crosses IB once per target node and is
forwarded over NVLink to the experts there; both transfers overlap, so while a node receives up to
NVLink / IB (≈ 3.2) of a token's experts the NVLink hop costs nothing extra, and with M = 4 nodes a
token could use up to 4 x 3.2 ≈ 13 experts at the communication cost of 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sourcelm.plan.model_costs import DTYPE_BYTES

LINK_CLASSES = ("inter_node", "intra_node")


def dispatch_rows(topk_idx: list[torch.Tensor], ep: int, ranks_per_node: int, n_experts: int,
                  dispatcher: str = "two_hop") -> list[dict[str, int]]:
    """Rows each rank sends per link class in one forward dispatch. topk_idx[r]: rank r's [T_r, K]
    global expert ids (-1: no expert); ranks are numbered node-major and EP groups are contiguous,
    as in `sourcelm.parallel.topology`."""
    world = len(topk_idx)
    el = min(ep, ranks_per_node)  # ranks of an EP group on one node
    e_local = n_experts // ep
    sent = [{c: 0 for c in LINK_CLASSES} for _ in range(world)]

    def link(a: int, b: int) -> str | None:
        return None if a == b else "intra_node" if a // ranks_per_node == b // ranks_per_node else "inter_node"

    for src, idx in enumerate(topk_idx):
        if idx.numel() == 0:
            continue
        base, pos = src - src % ep, src % ep  # the EP group's first rank; the sender's position in it
        valid = idx >= 0
        dest = torch.where(valid, idx // e_local, torch.full_like(idx, ep))  # EP position, ep = none
        in_rank = torch.zeros(idx.shape[0], ep + 1, dtype=torch.bool)
        in_rank.scatter_(1, dest, True)
        in_rank = in_rank[:, :ep]  # [T, ep]: token goes to position p
        if dispatcher == "flat":
            for p, rows in enumerate(in_rank.sum(0).tolist()):
                kind = link(src, base + p)
                if kind and rows:
                    sent[src][kind] += rows
            continue
        by_node = in_rank.view(-1, ep // el, el)  # [T, EP node, local index]
        for n in range(ep // el):
            forwarder = base + n * el + pos % el  # the rank at the sender's local index on node n
            arriving = by_node[:, n].any(-1)
            kind = link(src, forwarder)
            if kind:
                sent[src][kind] += int(arriving.sum())
            for j, rows in enumerate(by_node[arriving, n].sum(0).tolist()):
                kind = link(forwarder, base + n * el + j)
                if kind and rows:
                    sent[forwarder][kind] += rows
    return sent


@dataclass(frozen=True)
class RowBytes:
    """Bytes per hidden element of the rows of a MoE layer's four transfers in a training step."""

    dispatch: float  # the tokens to their experts
    combine: float  # the experts' outputs back
    combine_backward: float  # the output's gradient to the experts (a dispatch)
    dispatch_backward: float  # the input's gradient back (a combine)

    @property
    def forward(self) -> float:
        return self.dispatch + self.combine

    @property
    def backward(self) -> float:
        return self.combine_backward + self.dispatch_backward


def row_element_bytes(recipe: str, dtype: str, hidden: int) -> RowBytes:
    """What each transfer moves per hidden element. sourcelm dispatches the MoE norm's output, which stays fp32
    for the fp32 router under autocast (its gradient comes back fp32 too), and combines the experts' outputs in
    the compute dtype; under FP8 the dispatch and combine's backward are E4M3 rows with an fp32 scale per 128
    channels, the last tile's too when it is partial (`kernels.fp8_comm`). The report: FP8 to the experts, BF16
    back (§3.3.3)."""
    compute = float(DTYPE_BYTES[dtype])
    to_experts = 1 + 4 * math.ceil(hidden / 128) / hidden if dtype == "fp8" else None
    if recipe == "sourcelm":
        return RowBytes(to_experts or 4.0, compute, to_experts or compute, 4.0)
    return RowBytes(to_experts or compute, compute, to_experts or compute, compute)


def step_link_bytes(rows: dict[str, float], hidden: int, row_bytes: RowBytes,
                    backward: bool = True) -> dict[str, float]:
    """Bytes per link class of the dispatch + combine (and their backwards) of the given forward-dispatch rows."""
    per_row = hidden * (row_bytes.forward + (row_bytes.backward if backward else 0.0))
    return {f"{c}_bytes": rows.get(c, 0) * per_row for c in LINK_CLASSES}


def sampled_routing(cfg, tokens: int = 8192, seed: int = 0) -> torch.Tensor:
    """topk_idx [tokens, K] from the model's router (group-limited top-k with zero biases) on random
    hidden states: a balanced routing with the model's node limit. The selection does not depend on the
    hidden size, so the router is built 64 wide."""
    import dataclasses

    from sourcelm.model.moe import Router

    gen = torch.Generator().manual_seed(seed)
    cfg = dataclasses.replace(cfg, hidden_size=64)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * cfg.initializer_range)
        x = torch.randn(tokens, cfg.hidden_size, generator=gen)
        topk_idx, _, _ = router(x)
    return topk_idx


@dataclass(frozen=True)
class RoutingStats:
    """Forward-dispatch rows per routed token, per link class, for one layout (from a routing)."""

    inter_node: float
    intra_node: float
    nodes_per_token: float  # distinct EP nodes a token's experts lie on
    ranks_per_token: float  # distinct EP ranks
    source: str  # "sampled (balanced router)" or "measured"


def routing_stats(topk_idx: torch.Tensor, ep: int, ranks_per_node: int, n_experts: int, dispatcher: str,
                  source: str) -> RoutingStats:
    """Rows per token of `topk_idx` [T, K] spread evenly over the positions of one EP group."""
    t = topk_idx.shape[0]
    rows = dispatch_rows([topk_idx[r::ep] for r in range(ep)], ep, ranks_per_node, n_experts, dispatcher)
    e_local, el = n_experts // ep, min(ep, ranks_per_node)
    rank = torch.where(topk_idx >= 0, topk_idx // e_local, torch.full_like(topk_idx, -1))
    node = torch.where(rank >= 0, rank // el, rank)
    distinct = [sum(len(set(r) - {-1}) for r in m.tolist()) / max(t, 1) for m in (node, rank)]
    return RoutingStats(sum(r["inter_node"] for r in rows) / t, sum(r["intra_node"] for r in rows) / t,
                        distinct[0], distinct[1], source)


# --------------------------------------------------------------------------- the report's §3.2.2 figures


def experts_per_node_at_no_extra_cost(nvlink_bw: float, ib_bw: float) -> float:
    """While a node receives a token once over IB, NVLink can forward it to this many of its GPUs in the same time."""
    return nvlink_bw / ib_bw


def max_experts_at_same_cost(nodes_per_token: int, nvlink_bw: float, ib_bw: float) -> int:
    """Experts a token could select, M nodes x the free experts per node, at the communication cost of the IB hop."""
    return round(nodes_per_token * experts_per_node_at_no_extra_cost(nvlink_bw, ib_bw))


# --------------------------------------------------------------------------- collectives outside the MoE


def ring_bytes(size: float, members: int) -> float:
    """Bytes one member sends in a ring reduce-scatter or all-gather of `size` bytes."""
    return size * (members - 1) / members if members > 1 else 0.0


def collective_time(nbytes: float, bw: float, steps: int, latency: float) -> float:
    return nbytes / bw + steps * latency
