"""Dispatch/combine bytes per link class predicted from a routing equal the dispatchers' own counters;
the report's node-limited routing figures from the bandwidths."""

from __future__ import annotations

import pytest
import torch

from sourcelm.parallel.local_ranks import run_ranks
from sourcelm.plan import comms
from sourcelm.plan.cluster import load_cluster

from .routing_workers import HIDDEN, N_EXPERTS, counts_worker

CASES = ["router", "uniform", "skewed", "with_none"]
WORLD = 4


@pytest.fixture(scope="module", params=[2, 4], ids=["2nodes_x_2", "1node_x_4"])
def measured(request):
    return request.param, run_ranks(counts_worker, WORLD, request.param, CASES)


def test_predicted_rows_equal_the_dispatchers_counters(measured):
    rpn, res = measured
    for kind in ("flat", "two_hop"):
        for case in CASES:
            routes = [res[r][(kind, case)]["idx"] for r in range(WORLD)]
            predicted = comms.dispatch_rows(routes, WORLD, rpn, N_EXPERTS, kind)
            for r in range(WORLD):
                got = res[r][(kind, case)]["forward"]
                for link in comms.LINK_CLASSES:
                    assert predicted[r][link] == got[f"{link}_rows"], (rpn, kind, case, r, link)
                    assert got[f"{link}_bytes"] == predicted[r][link] * HIDDEN * 4
    # the cases really exercise both link classes, and the one-node layout sends nothing inter-node
    two_hop = comms.dispatch_rows([res[r][("two_hop", "uniform")]["idx"] for r in range(WORLD)], WORLD, rpn,
                                  N_EXPERTS, "two_hop")
    assert sum(p["intra_node"] for p in two_hop) > 0
    assert (sum(p["inter_node"] for p in two_hop) > 0) == (rpn == 2)


def test_round_trip_bytes_are_rows_times_hidden_times_both_dtypes_twice(measured):
    """A training step moves each row four times: the fp32 dispatch and its backward (a combine of the
    received rows' fp32 gradients), the bf16 combine and its backward (a dispatch of its bf16 gradients)."""
    rpn, res = measured
    for kind in ("flat", "two_hop"):
        for case in CASES:
            routes = [res[r][(kind, case)]["idx"] for r in range(WORLD)]
            rows = comms.dispatch_rows(routes, WORLD, rpn, N_EXPERTS, kind)
            total_rows = {c: sum(p[c] for p in rows) for c in comms.LINK_CLASSES}
            expect = comms.step_link_bytes(total_rows, HIDDEN, comms.row_element_bytes("sourcelm", "bf16", HIDDEN))
            for link in comms.LINK_CLASSES:
                got = sum(res[r][(kind, case)]["round_trip"][f"{link}_bytes"] for r in range(WORLD))
                assert got == expect[f"{link}_bytes"], (rpn, kind, case, link)


def test_two_hop_crosses_nodes_once_per_node():
    """One token on rank 0 of 2 nodes x 2, experts on ranks 0, 1 and 3 (two per rank): flat sends a row to
    ranks 1 (intra) and 3 (inter); two-hop sends one row to node 1 (rank 2, inter), which forwards it to
    rank 3 (intra), and one row to rank 1 (intra)."""
    idx = [torch.tensor([[0, 3, 6]]), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long),
           torch.zeros(0, 3, dtype=torch.long)]
    flat = comms.dispatch_rows(idx, 4, 2, 8, "flat")
    assert flat[0] == {"inter_node": 1, "intra_node": 1} and all(p == {"inter_node": 0, "intra_node": 0}
                                                                 for p in flat[1:])
    two = comms.dispatch_rows(idx, 4, 2, 8, "two_hop")
    assert two[0] == {"inter_node": 1, "intra_node": 1} and two[2] == {"inter_node": 0, "intra_node": 1}
    stats = comms.routing_stats(torch.tensor([[0, 3, 6]] * 4), 4, 2, 8, "two_hop", "hand-made")
    assert (stats.nodes_per_token, stats.ranks_per_token) == (2, 3)


def test_report_experts_per_node_and_per_token_from_the_bandwidths():
    """Report §3.2.2: NVLink ≈ 160 GB/s is 3.2 x IB ≈ 50 GB/s, so a token can reach 3.2 experts per node at
    no extra NVLink cost, and with M = 4 nodes up to 13 experts at the cost of the IB hop."""
    h800 = load_cluster("h800")
    assert comms.experts_per_node_at_no_extra_cost(h800.nvlink_bw, h800.ib_bw) == pytest.approx(3.2)
    assert comms.max_experts_at_same_cost(4, h800.nvlink_bw, h800.ib_bw) == 13
    h100 = load_cluster("h100")  # NVLink 4's link rate: 9 experts per node, 36 over 4 nodes
    assert comms.max_experts_at_same_cost(4, h100.nvlink_bw, h100.ib_bw) == 36


def test_sampled_routing_keeps_the_node_limit():
    from sourcelm.config import load_config

    cfg = load_config("deepseek-v3-671b").model
    idx = comms.sampled_routing(cfg, tokens=2048)
    stats = comms.routing_stats(idx, 64, 8, cfg.n_routed_experts, "two_hop", "sampled")
    assert idx.shape == (2048, 8)
    node = idx // 32  # EP64 over 8 nodes: 32 experts per node
    assert max(len(set(r)) for r in node.tolist()) <= 4  # M = 4
    assert 3.5 < stats.nodes_per_token <= 4 and stats.ranks_per_token <= 8
    # one IB row per remote node (7 of 8 nodes are remote), the rest forwarded over NVLink
    assert stats.inter_node == pytest.approx(stats.nodes_per_token * 7 / 8, rel=0.05)
