"""The FP8 dispatch (report §3.3.3) on 4 gloo processes, 2 pretend nodes × 2 ranks: rows already on the power-of-2
E4M3 grid (as `ops.routed_experts_input` leaves them) arrive bit for bit as the compute-dtype dispatch delivers
them, forward and backward, through every dispatcher; the bytes of the dispatch and of combine's backward shrink
to K + 4·ceil(K/128) a row, the forward combine and dispatch's backward keep their dtypes' (bf16 outputs, the
fp32 input's gradient), as the planner counts them."""

import pytest
import torch

from sourcelm.kernels.fp8_comm import row_bytes
from sourcelm.parallel.local_ranks import run_ranks
from sourcelm.plan import comms

from .dispatch_workers import fp8_wire_worker

KINDS = ("flat", "two_hop", "two_hop_chunked")
WORLD, HIDDEN = 4, 200


@pytest.fixture(scope="module")
def res():
    return run_ranks(fp8_wire_worker, WORLD, 2, KINDS, HIDDEN)


def test_fp8_rows_arrive_bit_for_bit(res):
    for kind in KINDS:
        for r in range(WORLD):
            plain, fp8 = res[r][(kind, False)], res[r][(kind, True)]
            for key in ("recv_x", "out", "dx", "dw"):
                assert torch.equal(plain[key], fp8[key]), (kind, r, key)
            assert plain["recv_x"].abs().max() > 0


def test_fp8_rows_cost_k_plus_scales_bytes(res):
    fp32_row, bf16_row, fp8_row = 4 * HIDDEN, 2 * HIDDEN, row_bytes(HIDDEN)
    assert fp8_row == HIDDEN + 8
    for kind in KINDS:
        for r in range(WORLD):
            plain, fp8 = res[r][(kind, False)], res[r][(kind, True)]
            for link in ("inter_node", "intra_node"):
                rows = plain["dispatch"][f"{link}_rows"]
                back = plain["backward"][f"{link}_rows"]  # dispatch's backward (a combine) + combine's (a dispatch)
                assert fp8["dispatch"][f"{link}_rows"] == rows and fp8["backward"][f"{link}_rows"] == back
                assert plain["dispatch"][f"{link}_bytes"] == rows * fp32_row
                assert fp8["dispatch"][f"{link}_bytes"] == rows * fp8_row, (kind, r, link)
                assert fp8["combine"] == plain["combine"]  # the forward combine stays bf16
                # backward: combine's backward sends the dispatch's rows in FP8 (bf16 without), dispatch's backward
                # the combine's rows in fp32 (the input's gradient)
                combine_rows = plain["combine"][f"{link}_rows"]
                assert back == rows + combine_rows
                assert plain["backward"][f"{link}_bytes"] == rows * bf16_row + combine_rows * fp32_row
                assert fp8["backward"][f"{link}_bytes"] == rows * fp8_row + combine_rows * fp32_row, (kind, r, link)
        assert any(res[r][(kind, True)]["dispatch"]["inter_node_rows"] for r in range(WORLD))


def test_the_planner_counts_the_fp8_step(res):
    """`sourcelm plan`'s bytes for a step (the four transfers, from the forward dispatch's rows) equal the counters,
    summed over the ranks, with and without FP8."""
    for kind in KINDS:
        for fp8, dtype in ((False, "bf16"), (True, "fp8")):
            runs = [res[r][(kind, fp8)] for r in range(WORLD)]
            rows = {c: sum(run["dispatch"][f"{c}_rows"] for run in runs) for c in comms.LINK_CLASSES}
            predicted = comms.step_link_bytes(rows, HIDDEN, comms.row_element_bytes("sourcelm", dtype, HIDDEN))
            for c in comms.LINK_CLASSES:
                got = sum(run[part][f"{c}_bytes"] for run in runs for part in ("dispatch", "combine", "backward"))
                assert got == predicted[f"{c}_bytes"], (kind, dtype, c)
