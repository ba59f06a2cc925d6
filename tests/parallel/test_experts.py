"""Expert-parallel layer and model on 4 gloo processes equal the single-process ones (fp32)."""

from __future__ import annotations

import pytest

from sourcelm.parallel.local_ranks import run_ranks

from .experts_workers import model_worker, moe_layer_worker, overlap_order_worker

# (ep, ranks_per_node, dispatcher): 2 nodes x 2 with both dispatchers, 1 node x 4, and EP 2 with two
# expert replicas whose gradients are summed over the replica group
LAYOUTS = [(4, 2, "two_hop"), (4, 2, "flat"), (4, 4, "two_hop"), (2, 1, "two_hop")]
TOL = 1e-5


@pytest.mark.parametrize("ep,rpn,kind", LAYOUTS)
def test_moe_layer_matches_single_process(ep, rpn, kind):
    res = run_ranks(moe_layer_worker, 4, ep, rpn, kind)
    for r, per_rank in enumerate(res):
        for name, cmp in per_rank.items():
            assert cmp["rel"] <= TOL, (r, name, cmp)


@pytest.mark.parametrize("ep,rpn,kind", [(4, 2, "two_hop"), (2, 1, "flat")])
def test_model_matches_single_process(ep, rpn, kind):
    res = run_ranks(model_worker, 4, ep, rpn, kind)
    for r in res:
        assert r["n_moe_layers"] == 2  # the main MoE layer and the MTP block's
        assert r["loss"]["rel"] <= TOL and r["logits"]["rel"] <= TOL, r
        assert r["worst_grad_rel"] <= 10 * TOL, r["worst_grad_rel"]
        assert r["gathered_equal"] and r["reloaded_equal"] and r["init_equal"]
    # experts of 8 split in ep slices, named by their global (single-device) names
    starts = sorted({v[1] for r in res for v in r["shards"].values()})
    assert starts == list(range(0, 8, 8 // ep))
    assert all(v[3][0] == 8 and v[0] == k for r in res for k, v in r["shards"].items())
    # 2 nodes: the MoE layers moved rows across nodes
    assert sum(r["stats"]["inter_node_bytes"] for r in res) > 0


def test_shared_expert_overlaps_dispatch_in_forward_and_backward():
    """2 ranks as 2 nodes: the first hop crosses nodes. Forward: dispatch issues its all-to-all, the
    shared expert runs, then the dispatch waits. Backward: the reverse of that hop is issued (dispatch
    backward), the shared expert's backward runs, then it is waited for."""
    for log in run_ranks(overlap_order_worker, 2):
        split = log.index("-- backward --")
        fwd, bwd = log[:split], log[split + 1:]
        i = fwd.index("shared expert forward")
        assert fwd[i - 1] == "issue forward" and fwd[i + 1] == "wait", fwd
        j = bwd.index("shared expert backward")
        assert "issue reverse" in bwd[:j] and bwd[j + 1:].count("wait") >= 1, bwd
        last_issue = max(k for k, e in enumerate(bwd[:j]) if e == "issue reverse")
        assert "wait" not in bwd[last_issue + 1:j], bwd  # still in flight while the shared expert runs
