"""The MoE's FP8 communication (`fp8_comm`): power-of-2 tile scales, the straight-through rounding of the routed
experts' input and output gradient, and the packed wire rows, against a float64 reference."""

import pytest
import torch

from sourcelm.kernels import fp8, fp8_comm, ops

E4M3_GRID = fp8._E4M3_VALUES[torch.isfinite(fp8._E4M3_VALUES)].double().unique()  # every finite E4M3 value


def _activations(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, one tile with a huge outlier, one all-zero tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-6, 4, rows)[:, None]
    x[1, 5] = 3e5
    x[2, :128] = 0
    return x


def _reference_round(x: torch.Tensor) -> torch.Tensor:
    """float64 reference: scale = the smallest power of 2 >= amax / 448 per 1×128 tile, each element / scale rounded
    to the nearest E4M3 value (ties to the even mantissa, which the grid's ordering gives by index parity)."""
    out = torch.empty_like(x, dtype=torch.float64)
    for r in range(x.shape[0]):
        for c in range(0, x.shape[1], 128):
            tile = x[r, c:c + 128].double()
            amax = max(tile.abs().max().item(), fp8.AMAX_FLOOR)
            scale = 2.0 ** torch.tensor(amax / 448).log2().ceil().item()
            v = tile / scale
            dist = (v.abs()[:, None] - E4M3_GRID[None]).abs()
            best = dist.min(1, keepdim=True).values
            ties = (dist == best)
            idx = torch.where(ties.sum(1) > 1, ties.int().argmax(1) + (ties.int().argmax(1) % 2), dist.argmin(1))
            out[r, c:c + 128] = E4M3_GRID[idx] * v.sign() * scale
    return out


def test_pow2_scales_round_as_the_float64_reference():
    x = _activations(6, 200)
    got = fp8_comm.round_input(x)
    assert torch.equal(got.double(), _reference_round(x))
    op = fp8.quantize_operand(x, 1, pow2=True)
    assert bool((torch.frexp(op.scale)[0] == 0.5).all())  # every scale a power of 2


def test_requantizing_on_the_pow2_grid_loses_nothing():
    """The property the FP8 dispatch rests on: rounded rows quantize again to the same values, in FP32 and BF16, so
    the wire and the up projection's Fprop take the dispatched tiles as they are."""
    for seed in range(5):
        x = fp8_comm.round_input(_activations(8, 384, seed))
        assert torch.equal(fp8_comm.round_input(x), x)
        assert torch.equal(fp8_comm.round_input(x.bfloat16()).float(), x)
        k = x.shape[1]
        assert torch.equal(fp8.dequantize_operand(fp8.quantize_operand(x, 1, pow2=True))[:, :k], x)


def test_amax_scales_would_round_again():
    """Why the up projection takes power-of-2 scales: with amax/448 scales the dispatched tiles would be rounded a
    second time."""
    x = fp8_comm.round_input(_activations(8, 384))
    again = fp8.dequantize_operand(fp8.quantize_operand(x, 1))[:, :384]
    assert not torch.equal(again, x)


def test_packed_rows_carry_the_rounded_values_bit_for_bit():
    x = _activations(7, 200)
    buf = fp8_comm.pack_rows(x)
    assert buf.dtype == torch.uint8 and tuple(buf.shape) == (7, 200 + 4 * 2) == (7, fp8_comm.row_bytes(200))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fp8_comm.unpack_rows(buf, 200, dtype), fp8_comm.round_input(x).to(dtype))
    assert fp8_comm.unpack_rows(fp8_comm.pack_rows(x[:0]), 200, torch.float32).shape == (0, 200)
    with pytest.raises(ValueError, match="208 bytes; 300 features take 312"):
        fp8_comm.unpack_rows(buf, 300, torch.float32)


def test_non_finite_tiles_stay_non_finite():
    x = _activations(3, 256)
    x[0, 3], x[1, 200] = float("inf"), float("nan")
    got = fp8_comm.unpack_rows(fp8_comm.pack_rows(x), 256, torch.float32)
    assert bool(got[0, :128].isnan().all()) and bool(got[1, 128:].isnan().all())  # the whole tile, no clamp
    assert bool(got[0, 128:].isfinite().all()) and bool(got[2].isfinite().all())


def test_rounding_is_straight_through():
    """round_input rounds the value and passes the gradient; round_output_grad passes the value and rounds the
    gradient; both are identities with FP8 off."""
    x = _activations(4, 200).requires_grad_()
    g = _activations(4, 200, seed=1)
    with ops.linear_precision("emulate"):
        y = ops.routed_experts_input(x)
        z = ops.routed_experts_output(x * 1.0)
    assert torch.equal(y.detach(), fp8_comm.round_input(x.detach()))
    assert torch.equal(z.detach(), x.detach())
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g)
    (gz,) = torch.autograd.grad(z, x, g)
    assert torch.equal(gz, fp8_comm.round_input(g))
    assert ops.routed_experts_input(x) is x and ops.routed_experts_output(x) is x


def test_up_projection_fprop_takes_the_dispatched_tiles_as_they_are():
    """Under FP8 the experts' first GEMM on rounded rows equals the emulated GEMM on those exact values."""
    x = fp8_comm.round_input(_activations(5, 256))
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    y = fp8.fp8_linear(x, w, pow2_scales=True)
    exact = fp8.quantize_operand(x, 1, pow2=True)
    assert torch.equal(fp8.dequantize_operand(exact)[:5], x)
    assert torch.equal(y, fp8.emulated_mm(exact, fp8.quantize_operand(w, fp8.TILE)))
