"""Layout arithmetic, validation messages, group partitions, and node-limited routing."""

from __future__ import annotations

import pytest
import torch

from sourcelm.config import ConfigError, ModelConfig
from sourcelm.model.moe import Router
from sourcelm.parallel.topology import Layout, build_topology, partitions


def test_partitions_two_nodes_of_four_ep_four():
    p = partitions(Layout(world=8, ranks_per_node=4, ep=4, n_routed_experts=16))
    assert p["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert p["dp"] == [list(range(8))]
    assert p["expert_replica"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert p["intra_node"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert p["inter_node"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert p["ep_intra"] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # each EP group fits inside one node
    assert p["ep_inter"] == [[0], [1], [2], [3], [4], [5], [6], [7]]


def test_partitions_ep_spanning_nodes():
    lay = Layout(world=8, ranks_per_node=2, ep=4, n_routed_experts=8, n_group=4)
    p = partitions(lay)
    assert (lay.nodes, lay.ep_nodes, lay.ep_local, lay.experts_per_rank) == (4, 2, 2, 2)
    assert p["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert p["ep_intra"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert p["ep_inter"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert p["inter_node"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for kind, parts in p.items():  # every kind partitions the ranks
        assert sorted(r for g in parts for r in g) == list(range(8)), kind
    assert [lay.ep_node_of_expert(e) for e in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]


@pytest.mark.parametrize("kw,field", [
    (dict(world=6, ranks_per_node=4, ep=2, n_routed_experts=8), "ranks_per_node"),
    (dict(world=8, ranks_per_node=4, ep=3, n_routed_experts=9), "parallel.ep"),
    (dict(world=8, ranks_per_node=4, ep=8, n_routed_experts=12), "n_routed_experts"),
    (dict(world=12, ranks_per_node=4, ep=6, n_routed_experts=12), "whole"),
    (dict(world=8, ranks_per_node=2, ep=8, n_routed_experts=24, n_group=6), "model.n_group"),
])
def test_bad_layouts_fail_naming_the_fix(kw, field):
    with pytest.raises(ConfigError, match=field):
        Layout(**kw)


def test_single_process_topology_has_no_groups():
    topo = build_topology(ep=1, ranks_per_node=1, n_routed_experts=8)
    assert topo.world == 1 and topo.local_experts == range(0, 8)
    assert all(g is None for g in topo.groups.values())


def _router(n_experts, n_group, topk_group, k, hidden=16, seed=0):
    cfg = ModelConfig(hidden_size=hidden, n_routed_experts=n_experts, n_group=n_group, topk_group=topk_group,
                      num_experts_per_tok=k)
    router = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=g))
        router.e_score_correction_bias.copy_(torch.randn(n_experts, generator=g) * 0.1)
    return router, g


def _nodes_per_token(lay: Layout, topk_idx: torch.Tensor) -> torch.Tensor:
    nodes = lay.ep_node_of_expert(topk_idx)
    return torch.tensor([len(set(row)) for row in nodes.tolist()])


# (world, ranks_per_node, ep, experts, n_group, topk_group, K): DeepSeek-V3's EP64 over 8 nodes, and
# small layouts with several groups per node
ROUTING_LAYOUTS = [(64, 8, 64, 256, 8, 4, 8), (8, 2, 8, 16, 4, 2, 4), (8, 2, 8, 16, 8, 2, 4), (4, 2, 4, 8, 4, 2, 4)]


@pytest.mark.parametrize("world,rpn,ep,experts,n_group,topk_group,k", ROUTING_LAYOUTS)
def test_node_limited_routing_bounds_nodes_per_token(world, rpn, ep, experts, n_group, topk_group, k):
    lay = Layout(world, rpn, ep, experts, n_group, topk_group)
    router, g = _router(experts, n_group, topk_group, k)
    x = torch.randn(512, 16, generator=g)
    # adversarial bias: the first expert of every node is strongly preferred, so an unlimited top-k
    # spreads each token over every node; the group limit must still keep it on at most M nodes
    per_node = experts // lay.ep_nodes
    adversarial_bias = torch.zeros(experts)
    adversarial_bias[::per_node] = 2.0
    for bias in (router.e_score_correction_bias.clone(), adversarial_bias):
        with torch.no_grad():
            router.e_score_correction_bias.copy_(bias)
        idx, _, _ = router(x)
        assert (_nodes_per_token(lay, idx) <= lay.max_nodes_per_token).all()
    assert lay.max_nodes_per_token == min(topk_group, lay.ep_nodes)
    # the bound is real: without the group limit the adversarial tokens reach more nodes than M
    plain, _ = _router(experts, 1, 1, k)
    with torch.no_grad():
        plain.weight.copy_(router.weight)
        plain.e_score_correction_bias.copy_(adversarial_bias)
    idx, _, _ = plain(x)
    if lay.ep_nodes > lay.max_nodes_per_token:
        assert _nodes_per_token(lay, idx).min() > lay.max_nodes_per_token
