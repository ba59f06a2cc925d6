"""Per-rank body of the byte-count test: real routings through the real dispatchers (run by run_ranks)."""

from __future__ import annotations

import torch

from sourcelm.config import ModelConfig
from sourcelm.model.moe import Router
from sourcelm.parallel.dispatch import make_dispatcher
from sourcelm.parallel.topology import build_topology

HIDDEN, N_EXPERTS = 16, 8


def routing(rank: int, case: str) -> torch.Tensor:
    """This rank's topk_idx for a named case; token counts differ by rank (one rank sends nothing)."""
    g = torch.Generator().manual_seed(100 + rank)
    n = [23, 0, 17, 31][rank % 4]
    if case == "router":  # the model's group-limited router: 2 groups (= nodes), keep 1, top 2
        cfg = ModelConfig(hidden_size=HIDDEN, n_routed_experts=N_EXPERTS, n_group=2, topk_group=1,
                          num_experts_per_tok=2)
        router = Router(cfg)
        with torch.no_grad():
            router.weight.copy_(torch.randn(router.weight.shape, generator=g))
            return router(torch.randn(n, HIDDEN, generator=g))[0]
    idx = torch.stack([torch.randperm(N_EXPERTS, generator=g)[:3] for _ in range(n)]) if n else \
        torch.zeros(0, 3, dtype=torch.long)
    if case == "skewed" and n:  # every token on expert 0: one rank receives all
        idx[:, 0] = 0
        idx[:, 1:] = torch.where(idx[:, 1:] == 0, torch.ones_like(idx[:, 1:]), idx[:, 1:])
    if case == "with_none" and n:
        idx[::3, -1] = -1
    return idx


def counts_worker(rank: int, world: int, ranks_per_node: int, cases: list[str]) -> dict:
    """For both dispatchers and each case: the counters after one forward dispatch, and after a training
    round trip with fp32 rows dispatched and bf16 rows combined (as the trainer's autocast does)."""
    topo = build_topology(ep=world, ranks_per_node=ranks_per_node, n_routed_experts=N_EXPERTS)
    out = {}
    for kind in ("flat", "two_hop"):
        d = make_dispatcher(kind, topo)
        for case in cases:
            idx = routing(rank, case)
            g = torch.Generator().manual_seed(rank)
            x = torch.randn(idx.shape[0], HIDDEN, generator=g, requires_grad=True)
            w = torch.rand(idx.shape, generator=g)
            d.stats.reset()
            d.dispatch(x.detach(), idx, w)
            forward = d.stats.reset()
            recv_x, local, recv_w, handle = d.dispatch(x, idx, w.requires_grad_())
            y = (recv_x * recv_w.sum(1, keepdim=True)).to(torch.bfloat16)
            d.combine(y, handle).float().sum().backward()
            out[(kind, case)] = {"idx": idx, "forward": forward, "round_trip": d.stats.reset()}
    return out
