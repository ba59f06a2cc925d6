"""Per-rank bodies of the dispatch tests (run by sourcelm.parallel.local_ranks.run_ranks)."""

from __future__ import annotations

import torch

from sourcelm.parallel.dispatch import make_dispatcher
from sourcelm.parallel.topology import build_topology

HIDDEN = 6


def make_inputs(rank: int, scenario: str, n_experts: int, k: int, dyadic: bool):
    """Deterministic per-rank tokens, routes and weights for a named load pattern."""
    g = torch.Generator().manual_seed(1000 * rank + sum(map(ord, scenario)))
    n_tokens = {"random": [5, 7, 0, 3], "one_expert": [4, 4, 4, 4], "two_ranks_only": [6, 1, 9, 2],
                "with_none": [3, 8, 5, 1]}[scenario][rank % 4]
    if scenario == "one_expert":  # every token picks expert 0 (plus distinct others): one rank is hot
        rest = torch.stack([torch.randperm(n_experts - 1, generator=g)[: k - 1] + 1 for _ in range(n_tokens)]) \
            if n_tokens else torch.zeros(0, k - 1, dtype=torch.long)
        idx = torch.cat([torch.zeros(n_tokens, 1, dtype=torch.long), rest], 1)
    elif scenario == "two_ranks_only":  # experts of EP ranks 0 and 1 only: ranks 2 and 3 receive nothing
        half = n_experts // 2
        idx = torch.stack([torch.randperm(half, generator=g)[:k] for _ in range(n_tokens)]) if n_tokens \
            else torch.zeros(0, k, dtype=torch.long)
    else:
        idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n_tokens)]) if n_tokens \
            else torch.zeros(0, k, dtype=torch.long)
        if scenario == "with_none" and n_tokens:
            idx[::2, -1] = -1  # DeepEP's "no selection" slot
    if dyadic:  # small integers and multiples of 1/8: every sum below is exact in fp32
        x = torch.randint(-8, 9, (n_tokens, HIDDEN), generator=g).float()
        w = torch.randint(1, 8, (n_tokens, k), generator=g).float() / 8
    else:
        x = torch.randn(n_tokens, HIDDEN, generator=g)
        w = torch.rand(n_tokens, k, generator=g)
    w = torch.where(idx >= 0, w, torch.zeros_like(w))
    return x, idx, w


def identity_expert_roundtrip(dispatcher, x, idx, w, grad_seed: int):
    """dispatch -> per-row sum_k w_k * x (identity experts) -> combine, then backward."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    recv_x, local, recv_w, handle = dispatcher.dispatch(x, idx, w)
    y = torch.zeros_like(recv_x)
    for k in range(local.shape[1]):  # slot order, as the expert layer sums
        y = y + recv_w[:, k : k + 1] * recv_x * (local[:, k : k + 1] >= 0)
    out = dispatcher.combine(y, handle)
    g = torch.Generator().manual_seed(grad_seed)
    upstream = torch.randint(-4, 5, out.shape, generator=g).float()
    (out * upstream).sum().backward()
    return {"out": out.detach(), "dx": x.grad, "dw": w.grad, "upstream": upstream, "recv_x": recv_x.detach(),
            "local": local, "recv_w": recv_w.detach(), "per_expert": handle.num_recv_tokens_per_expert}


def roundtrip_worker(rank, world, ranks_per_node, cases, kinds=("flat", "two_hop"), chunk_rows=None):
    """For each dispatcher kind and every (scenario, dyadic) case: the identity-expert round trip, the
    layout, and the byte counters of one dispatch alone and of a whole forward + backward.
    chunk_rows: for two_hop_chunked (None: measured on its first dispatch)."""
    n_experts, k = 8, 3
    topo = build_topology(ep=world, ranks_per_node=ranks_per_node, n_routed_experts=n_experts)
    out = {}
    for kind in kinds:
        d = make_dispatcher(kind, topo, chunk_rows)
        for sc, dyadic in cases:
            x, idx, w = make_inputs(rank, sc, n_experts, k, dyadic)
            d.stats.reset()
            res = identity_expert_roundtrip(d, x, idx, w, grad_seed=rank)
            res.update(x=x, idx=idx, w=w, layout=[t.clone() for t in d.layout(idx)])
            res["stats_total"] = d.stats.reset()
            d.dispatch(x, idx, w)  # one forward dispatch alone, for the per-call counts
            res["stats_dispatch"] = d.stats.reset()
            again = identity_expert_roundtrip(d, x, idx, w, grad_seed=rank)  # same inputs, same bits
            res["repeat_equal"] = all(torch.equal(res[key], again[key]) for key in ("out", "dx", "dw"))
            out[(kind, sc, dyadic)] = res
            if kind == "two_hop_chunked":
                res["chunk_rows"] = d.chunk_rows
    out["members"] = dict(topo.members)
    return out


def fp8_wire_worker(rank, world, ranks_per_node, kinds, hidden):
    """Rows already on the FP8 dispatch's grid (2 tiles, the second partial) through each dispatcher, once in the
    compute dtype and once as E4M3 rows: the results, gradients and byte counters of both. As in training, the
    dispatched rows are fp32 (the norm of the fp32 residual stream) and the experts' outputs bf16."""
    from sourcelm.kernels import fp8_comm

    n_experts, k = 8, 3
    topo = build_topology(ep=world, ranks_per_node=ranks_per_node, n_routed_experts=n_experts)
    _, idx, w = make_inputs(rank, "random", n_experts, k, dyadic=False)
    g = torch.Generator().manual_seed(rank)
    x = fp8_comm.round_input(torch.randn(idx.shape[0], hidden, generator=g) * 10.0 ** (rank - 2))
    upstream = fp8_comm.round_input(torch.randn(idx.shape[0], hidden, generator=g)).bfloat16()
    out = {}
    for kind in kinds:
        d = make_dispatcher(kind, topo, 2 if kind == "two_hop_chunked" else None)
        for fp8 in (False, True):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            d.stats.reset()
            recv_x, local, recv_w, handle = d.dispatch(xr, idx, wr, fp8=fp8)
            bytes_dispatch = d.stats.reset()
            y = (recv_w[:, :, None] * recv_x[:, None, :] * (local >= 0)[:, :, None]).sum(1).bfloat16()
            combined = d.combine(y, handle)
            bytes_combine = d.stats.reset()
            combined.backward(upstream)
            out[(kind, fp8)] = {"recv_x": recv_x.detach(), "out": combined.detach(), "dx": xr.grad, "dw": wr.grad,
                                "dispatch": bytes_dispatch, "combine": bytes_combine, "backward": d.stats.reset()}
    return out
