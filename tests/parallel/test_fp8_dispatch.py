"""The FP8 dispatch (report §3.3.3) on 4 gloo processes, 2 pretend nodes × 2 ranks: rows already on the power-of-2
E4M3 grid (as `ops.routed_experts_input` leaves them) arrive bit for bit as the compute-dtype dispatch delivers
them, forward and backward, through every dispatcher; the bytes of the dispatch and of combine's backward shrink
to K + 4·ceil(K/128) a row, the forward combine and dispatch's backward keep the compute dtype's."""

import pytest
import torch

from sourcelm.kernels.fp8_comm import row_bytes
from sourcelm.parallel.local_ranks import run_ranks

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
    fp32_row, fp8_row = 4 * HIDDEN, row_bytes(HIDDEN)
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
                assert fp8["combine"] == plain["combine"]  # the forward combine stays in the compute dtype
                # backward: combine's backward sends the dispatch's rows in FP8, dispatch's backward the combine's
                # rows in the compute dtype
                combine_rows = plain["combine"][f"{link}_rows"]
                assert back == rows + combine_rows
                assert fp8["backward"][f"{link}_bytes"] == rows * fp8_row + combine_rows * fp32_row, (kind, r, link)
        assert any(res[r][(kind, True)]["dispatch"]["inter_node_rows"] for r in range(WORLD))
