"""Dispatch/combine on 4 gloo processes, as 2 pretend nodes x 2 ranks and as 1 node x 4 ranks.

The chunked two-hop dispatcher runs with 2-row chunks, so most transfers take several chunks.

Identity experts make the expected result exact (integer activations, weights in eighths): the round
trip must return sum_k w_k x_k bit for bit, and its gradients likewise. Flat and two-hop must agree
bit for bit on random floats too, and their byte counters must equal the counts derived from topk_idx.
"""

from __future__ import annotations

import pytest
import torch

from sourcelm.parallel.local_ranks import run_ranks
from sourcelm.parallel.topology import Layout, partitions

from .dispatch_workers import HIDDEN, roundtrip_worker

SCENARIOS = ("random", "one_expert", "two_ranks_only", "with_none")
CASES = [(sc, True) for sc in SCENARIOS] + [(sc, False) for sc in SCENARIOS]
KINDS = ("flat", "two_hop", "two_hop_chunked")
CHUNK_ROWS = 2
WORLD, N_EXPERTS = 4, 8


@pytest.fixture(scope="module", params=[2, 4], ids=["2nodes_x_2", "1node_x_4"])
def run(request):
    return request.param, run_ranks(roundtrip_worker, WORLD, request.param, CASES, KINDS, CHUNK_ROWS)


def test_identity_experts_return_weighted_sum_exactly(run):
    _, res = run
    for kind in KINDS:
        for sc in SCENARIOS:
            for r in range(WORLD):
                d = res[r][(kind, sc, True)]
                x, w, up = d["x"], d["w"], d["upstream"]
                assert torch.equal(d["out"], (w[:, :, None] * x[:, None, :]).sum(1)), (kind, sc, r)
                assert torch.equal(d["dx"], w.sum(1, keepdim=True) * up), (kind, sc, r)
                expect_dw = torch.where(d["idx"] >= 0, (x * up).sum(1, keepdim=True).expand_as(w), 0.0)
                assert torch.equal(d["dw"], expect_dw), (kind, sc, r)


def test_received_rows_grouped_by_source_rank_then_token(run):
    _, res = run
    e_local = N_EXPERTS // WORLD
    for kind in KINDS:
        for sc in SCENARIOS:
            for dst in range(WORLD):
                rows, local, weights = [], [], []
                for src in range(WORLD):
                    s = res[src][(kind, sc, False)]
                    mine = (s["idx"] >= 0) & (s["idx"] // e_local == dst)
                    tok = mine.any(1)
                    rows.append(s["x"][tok])
                    local.append(torch.where(mine, s["idx"] - dst * e_local, -1)[tok])
                    weights.append(torch.where(mine, s["w"], 0.0)[tok])
                got = res[dst][(kind, sc, False)]
                assert torch.equal(got["recv_x"], torch.cat(rows)), (kind, sc, dst)
                assert torch.equal(got["local"], torch.cat(local)), (kind, sc, dst)
                assert torch.equal(got["recv_w"], torch.cat(weights)), (kind, sc, dst)
                counts = torch.bincount(torch.cat(local)[torch.cat(local) >= 0], minlength=e_local).tolist()
                assert got["per_expert"] == counts
    # the skewed scenarios really are skewed
    assert all(res[r][("flat", "two_ranks_only", True)]["recv_x"].shape[0] == 0 for r in (2, 3))
    assert res[0][("flat", "one_expert", True)]["recv_x"].shape[0] == 16  # all 16 tokens reach rank 0


def test_layout_counts(run):
    rpn, res = run
    for r in range(WORLD):
        for sc in SCENARIOS:
            d = res[r][("two_hop", sc, False)]
            per_rank, per_node, in_rank = d["layout"]
            idx = d["idx"]
            expect = torch.zeros(idx.shape[0], WORLD, dtype=torch.bool)
            for t, row in enumerate(idx.tolist()):
                for e in row:
                    if e >= 0:
                        expect[t, e // (N_EXPERTS // WORLD)] = True
            assert torch.equal(in_rank, expect)
            assert per_rank.tolist() == expect.sum(0).tolist()
            assert per_node.tolist() == expect.view(-1, WORLD // rpn, rpn).any(-1).sum(0).tolist()


def expected_rows(res, kind, sc, rpn):
    """Rows sent over each link class by one dispatch, summed over ranks, derived from topk_idx."""
    e_local, inter, intra = N_EXPERTS // WORLD, 0, 0
    for src in range(WORLD):
        for row in res[src][(kind, sc, False)]["idx"].tolist():
            ranks = sorted({e // e_local for e in row if e >= 0})
            if kind == "flat":  # one copy per destination rank
                inter += sum(d // rpn != src // rpn for d in ranks)
                intra += sum(d // rpn == src // rpn and d != src for d in ranks)
            else:  # both two-hop kinds: one copy per destination node, then forwarded inside it by the same local index
                nodes = {d // rpn for d in ranks}
                inter += sum(n != src // rpn for n in nodes)
                intra += sum(d != (d // rpn) * rpn + src % rpn for d in ranks)
    return inter, intra


def test_byte_counters_equal_counts_from_topk_idx(run):
    rpn, res = run
    row_bytes = HIDDEN * 4
    for kind in KINDS:
        for sc in SCENARIOS:
            inter, intra = expected_rows(res, kind, sc, rpn)
            got = {key: sum(res[r][(kind, sc, False)]["stats_dispatch"][key] for r in range(WORLD))
                   for key in ("inter_node_rows", "intra_node_rows", "inter_node_bytes", "intra_node_bytes")}
            assert got == {"inter_node_rows": inter, "intra_node_rows": intra,
                           "inter_node_bytes": inter * row_bytes, "intra_node_bytes": intra * row_bytes}, (kind, sc)
            # forward dispatch + forward combine + their two backward passes move the same rows 4 times
            total = sum(res[r][(kind, sc, False)]["stats_total"]["inter_node_bytes"] for r in range(WORLD))
            assert total == 4 * inter * row_bytes
    if rpn == WORLD:  # one node: nothing crosses nodes
        assert all(res[r][(k, sc, False)]["stats_dispatch"]["inter_node_bytes"] == 0
                   for r in range(WORLD) for k in KINDS for sc in SCENARIOS)
    else:  # two-hop sends fewer inter-node rows than flat as soon as a token has 2 experts on a node
        assert expected_rows(res, "two_hop", "random", rpn)[0] < expected_rows(res, "flat", "random", rpn)[0]


def test_all_dispatchers_are_bit_identical_and_repeatable(run):
    _, res = run
    for sc in SCENARIOS:
        for r in range(WORLD):
            a = res[r][("flat", sc, False)]
            for kind in KINDS[1:]:
                b = res[r][(kind, sc, False)]
                assert a["repeat_equal"] and b["repeat_equal"]
                for key in ("out", "dx", "dw", "recv_x", "local", "recv_w"):
                    assert torch.equal(a[key], b[key]), (kind, sc, r, key)
            # chunking moves the same rows as the unchunked two-hop
            chunked, whole = res[r][("two_hop_chunked", sc, False)], res[r][("two_hop", sc, False)]
            assert chunked["stats_total"] == whole["stats_total"]


def test_every_rank_joined_its_groups(run):
    rpn, res = run
    parts = partitions(Layout(WORLD, rpn, WORLD, N_EXPERTS))
    for r in range(WORLD):
        for kind, members in res[r]["members"].items():
            assert members in parts[kind] and r in members, (r, kind)
