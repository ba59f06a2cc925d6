"""The MoE's FP8 communication (report §3.3.3): tokens are dispatched to their experts as E4M3 1×128 tiles with
power-of-2 scales, and the gradient of the combined expert output travels back to the experts (combine's backward,
which is a dispatch) in the same format. The other two directions, the forward combine and dispatch's backward,
stay in the compute dtype (BF16), as the report keeps them.

Two parts, so that the numerics do not depend on the layout:

* The rounding, on every layout (`round_input`, `round_output_grad`, called by the routed experts' forward on one
  process and under expert parallelism alike): the routed experts' input is rounded through the tiles, its
  gradient passed through unchanged (straight-through, as for every quantization of the recipe); the routed output
  is passed unchanged and its gradient rounded through the tiles. With no dispatch (one process, EP 1) the numbers
  are therefore the ones a dispatch in FP8 would deliver.
* The wire (`pack_rows`, `unpack_rows`, used by the dispatcher): rows as E4M3 bytes and their FP32 scales side by
  side, K + 4·ceil(K/128) bytes a row instead of 2K (BF16) or 4K (FP32). Packing a row that was already rounded
  through power-of-2 tiles loses nothing (a tile quantized on the power-of-2 grid quantizes again to the same
  values: its new scale is the old one or a power of 2 below, and E4M3 values scale by powers of 2 exactly), so the
  dispatcher delivers bit for bit what the rounding above produced.

The experts' up projection quantizes its input with power-of-2 scales too (`ops.linear(..., pow2_scales=True)`),
which for the same reason reproduces the dispatched tiles exactly: the FP8 tokens feed its Fprop as they arrived.
Where the routing weight enters the gradient is not in the report: here the expert side multiplies the FP8
gradient by each slot's weight, as DeepEP's combine applies the weights on the expert side, and the down
projection's Dgrad quantizes that product again (amax scales, as its other GEMMs). Has run on CPU (gloo) only.
"""

from __future__ import annotations

import torch

from sourcelm.kernels.fp8 import E4M3, TILE, Operand, dequantize_operand, quantize_operand

SCALE_BYTES = 4  # one fp32 scale per 1×128 tile


def _round_through_tiles(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] through E4M3 1×128 tiles with power-of-2 scales and back, in x's dtype (exact in BF16 and FP32)."""
    k = x.shape[-1]
    op = quantize_operand(x.reshape(-1, k), 1, pow2=True)
    return dequantize_operand(op)[:, :k].to(x.dtype).reshape(x.shape)


class _RoundInput(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _round_through_tiles(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _RoundOutputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return _round_through_tiles(grad)


def round_input(x: torch.Tensor) -> torch.Tensor:
    """The routed experts' input as an FP8 dispatch delivers it: x [N, H] rounded through power-of-2 E4M3 tiles;
    its gradient passes unchanged."""
    return _RoundInput.apply(x)


def round_output_grad(y: torch.Tensor) -> torch.Tensor:
    """The routed experts' combined output y [N, H], unchanged; in backward its gradient is rounded through
    power-of-2 E4M3 tiles, as an FP8 combine-backward delivers it to the experts."""
    return _RoundOutputGrad.apply(y)


def row_bytes(k: int) -> int:
    """Bytes of one packed row of k features."""
    return k + SCALE_BYTES * -(-k // TILE)


def pack_rows(x: torch.Tensor) -> torch.Tensor:
    """x [N, K] (already rounded through power-of-2 tiles: nothing is lost) -> uint8 [N, row_bytes(K)]: each row's
    E4M3 bytes, then its tiles' FP32 scales as bytes."""
    n, k = x.shape
    op = quantize_operand(x, 1, pow2=True)
    return torch.cat([op.q[:n, :k].view(torch.uint8), op.scale.view(torch.uint8)], dim=1)


def unpack_rows(buf: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `pack_rows`: uint8 [N, row_bytes(K)] -> [N, K] in dtype."""
    n = buf.shape[0]
    if buf.shape[1] != row_bytes(k):
        raise ValueError(f"FP8 rows of {buf.shape[1]} bytes; {k} features take {row_bytes(k)}")
    k_padded = -(-k // TILE) * TILE
    q = torch.nn.functional.pad(buf[:, :k], (0, k_padded - k)).view(E4M3)
    scale = buf[:, k:].contiguous().view(torch.float32)
    return dequantize_operand(Operand(q, scale, n, 1))[:, :k].to(dtype)
