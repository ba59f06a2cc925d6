"""DeepSeek-V3's FP8 recipe: fine-grained E4M3 quantization and the FP8 linear (Fprop, Dgrad, Wgrad).

What runs in FP8 and what does not, per the report (§3.3; `reference/deepseek_v3.md` §2.4):

| op | precision |
|---|---|
| attention q_a, q_b (or q), kv_a, kv_b, o; dense FFN; routed and shared experts | E4M3, all three GEMMs (1) |
| the activations those GEMMs keep for backward | E4M3 1×128 tiles + FP32 scales |
| the attention core's output (o_proj's input), kept once for o_proj's Wgrad and the core's backward | E5M6 1×128 tiles, power-of-2 scales (2) |
| an FFN's SwiGLU: its input (gate, up) kept for backward, its output recomputed from it | E4M3 1×128 tiles (3) |
| MoE dispatch, and combine's backward (the output's gradient to the experts) | E4M3 1×128 tiles, power-of-2 scales (4) |
| MoE combine, and dispatch's backward | the compute dtype (BF16) |
| embedding; output head; MTP `eh_proj` and shared head | BF16 (the release keeps `eh_proj` BF16) |
| MoE gate (router) | BF16 in, FP32 scores (ours: FP32, as transformers) |
| RMSNorms; the softmax(QKᵀ)V attention core; SwiGLU's math; the losses | BF16 storage, FP32 math |
| master weights; weight gradients; AdamW moments | FP32; FP32; BF16 |

(1) `fp8_linear`: FP32 accumulation promoted every 128 of K; BF16 output (FP32 for Wgrad). Everything
else is the caller's plain linear / op. (2) `fp8_attention.fp8_attention_output`: the core and o_proj as one op.
(3) `fp8_swiglu_linear`, the down projection with its SwiGLU: the report does this for the MoE's SwiGLUs; here
every FFN's (the dense layers' too), one op for all three kinds. (4) `fp8_comm`: rounded so on every layout, sent
as E4M3 bytes under expert parallelism; the experts' up projection takes the dispatched tiles as they are.

Granularity (report §3.3.2): activations and activation gradients in 1×128 tiles (one token, 128
channels of the GEMM's reduction dim K), weights in 128×128 blocks. Scale = amax / 448 per tile or
block, online (no history); the stored scale is the dequantization factor (`weight_scale_inv` in the
released checkpoint). Each GEMM quantizes its operands along its own K:
  Fprop  y  = x·Wᵀ   x in 1×128 tiles along `in`, W in 128×128 blocks;
  Dgrad  dx = dy·W   dy in 1×128 tiles along `out`, W the same blocks (a 128×128 block grid is its own
                     transpose, so no second weight quantization);
  Wgrad  dW = dyᵀ·x  reduces over tokens: dy and the saved FP8 x are (de)quantized again in 128×1 tiles,
                     i.e. 1×128 tiles of dyᵀ and xᵀ (x is dequantized from its FP8 copy, transposed and
                     requantized, as the report describes).

Dimensions not divisible by 128 are padded, not refused: the tail tile or block is zero-filled, so its
scale is the amax of its real elements, and the zeros add nothing to any product. The tiny preset's
96-, 64- and 80-wide projections therefore run in FP8 like the rest.

The amax floor: DeepSeek's inference kernel clamps amax at 1e-4, which is harmless for O(1)
activations but would push small activation gradients (a token-mean loss puts 1/tokens into every one)
into E4M3's subnormals. Here the floor is 448 × the smallest normal fp32, just enough to keep the scale a
normal number: an all-zero tile quantizes to zeros with no 0/0. A tile holding inf or NaN gets a
non-finite scale and turns its whole tile non-finite, so the GEMM output is non-finite and the trainer's
non-finite check skips the step; no value is silently clamped to 448.

Backends: "emulate" (any device) quantizes exactly as above, dequantizes, and runs the GEMM in FP32 with
K summed in chunks of 128, each chunk's partial product added to an FP32 accumulator (the report's
promotion interval N_C = 128; inside a chunk the sum is FP32 here, finer than the tensor core's ~14 bits;
on a GPU it follows torch's fp32 matmul precision, i.e. TF32 where that is switched on).
"cuda" runs the same quantization and torch's blockwise-scaled FP8 GEMM (`torch.nn.functional.scaled_mm`
with BlockWise1x128 / BlockWise128x128 recipes, cuBLAS on SM90 with CUDA >= 12.9), all dims padded to
128. `check_fp8_setting` probes it against the emulation at start and refuses a device where it fails.
THE CUDA PATH HAS NOT RUN ON A GPU YET: it is written against torch's documented scale layouts only.
"""  # noqa: E501 (a markdown table row cannot wrap)

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sourcelm.config import ConfigError

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128  # tile length along K, block edge, and the FP32 promotion interval
AMAX_FLOOR = E4M3_MAX * torch.finfo(torch.float32).tiny
FP8_SETTINGS = ("off", "emulate", "cuda")
MIN_FP8_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores
PARTIALS_BUDGET = 1 << 24  # fp32 elements of per-chunk partial products the emulated GEMM holds at once


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------- quantization


class Operand(NamedTuple):
    """One GEMM operand in FP8: `q` [rows padded, K padded to 128] e4m3, `scale` fp32 [rows padded //
    block_rows, K padded // 128]; `rows` is the real row count, `block_rows` 1 (1×128 tiles) or 128."""
    q: torch.Tensor
    scale: torch.Tensor
    rows: int
    block_rows: int


def quantize_operand(x: torch.Tensor, block_rows: int, row_multiple: int = 1, pow2: bool = False) -> Operand:
    """x [R, K] (any float dtype) in tiles of block_rows × 128 along K; rows are padded to a multiple of
    max(block_rows, row_multiple) and K to a multiple of 128 with zeros, which leaves each scale the amax
    of its real elements / 448. pow2: each scale rounded up to a power of 2 (the report's scales for the MoE
    dispatch, `fp8_comm`), so that a tile already on that grid quantizes again to the same values."""
    rows, k = x.shape
    rows_p, k_p = _round_up(rows, max(block_rows, row_multiple)), _round_up(k, TILE)
    # contiguous (a transposed x for Wgrad is copied): the GEMMs read q row-major
    padded = x.contiguous() if (rows_p, k_p) == (rows, k) else F.pad(x, (0, k_p - k, 0, rows_p - rows))
    tiles = padded.view(rows_p // block_rows, block_rows, k_p // TILE, TILE)
    # max(max, -min) rather than abs().max(): no full-size temporary; both propagate NaN. Exact in any dtype.
    amax = torch.maximum(tiles.amax(dim=3), tiles.amin(dim=3).neg_()).amax(dim=1).float()
    scale = amax.clamp_min_(AMAX_FLOOR).div_(E4M3_MAX)
    if pow2:
        scale = _pow2_ceil(scale)
    # x / scale is computed in fp32 and stays within 448 * (1 + 2^-23), which rounds to 448 whether the
    # cast saturates or not: no clamp needed. A NaN (from an inf/NaN tile) stays NaN.
    q = (tiles / scale[:, None, :, None]).to(E4M3)
    return Operand(q.view(rows_p, k_p), scale, rows, block_rows)


def _pow2_ceil(scale: torch.Tensor) -> torch.Tensor:
    """The smallest power of 2 >= each finite scale (exact: frexp, not log2); inf and NaN stay as they are."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    up = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).int())
    return torch.where(torch.isfinite(scale), up, scale)


# every E4M3 bit pattern's value (NaN for 0x7f/0xff), for `e4m3_to_fp32`
_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).float()


def e4m3_to_fp32(q: torch.Tensor) -> torch.Tensor:
    """q.float(), the same bits. On CPU through a 256-entry table: torch's CPU cast from float8 converts one
    element at a time, 6x slower than the lookup, and it was a third of an emulated FP8 training step."""
    if q.device.type != "cpu":
        return q.float()
    return torch.index_select(_E4M3_VALUES, 0, q.view(torch.uint8).reshape(-1).int()).view(q.shape)


def dequantize_operand(op: Operand) -> torch.Tensor:
    """fp32 [rows padded, K padded]: each element times its tile's or block's scale."""
    return _scaled(e4m3_to_fp32(op.q), op.scale, op.block_rows)


def _scaled(padded: torch.Tensor, scale: torch.Tensor, block_rows: int) -> torch.Tensor:
    """padded fp32 [rows, K] (a fresh tensor: scaled in place) times its per-tile/block scales."""
    rows_p, k_p = padded.shape
    padded.view(rows_p // block_rows, block_rows, k_p // TILE, TILE).mul_(scale.float()[:, None, :, None])
    return padded


def quantize_tiles(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1×128 tiles along the last dim: (e4m3 tensor of x's shape, fp32 scales [..., ceil(K/128)])."""
    op = quantize_operand(x.reshape(-1, x.shape[-1]), 1)
    return op.q[:, :x.shape[-1]].reshape(x.shape), op.scale.reshape(*x.shape[:-1], -1)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """128×128 blocks of a matrix [R, C]: (e4m3 [R, C], fp32 scales [ceil(R/128), ceil(C/128)])."""
    op = quantize_operand(w, TILE)
    return op.q[:w.shape[0], :w.shape[1]], op.scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize_tiles`: q [..., K] e4m3, scale [..., ceil(K/128)] fp32 -> q's shape in dtype."""
    k = q.shape[-1]
    _check_scale_shape(scale, (*q.shape[:-1], -(-k // TILE)), "1x128 tile")
    padded = F.pad(e4m3_to_fp32(q.reshape(-1, k)), (0, _round_up(k, TILE) - k))
    return _scaled(padded, scale.reshape(-1, scale.shape[-1]), 1)[:, :k].reshape(q.shape).to(dtype)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The inverse of `quantize_blocks`: q [R, C] e4m3 (partial edge blocks allowed), scale
    [ceil(R/128), ceil(C/128)] fp32 -> [R, C] in dtype."""
    rows, cols = q.shape
    _check_scale_shape(scale, (-(-rows // TILE), -(-cols // TILE)), "128x128 block")
    padded = F.pad(e4m3_to_fp32(q), (0, _round_up(cols, TILE) - cols, 0, _round_up(rows, TILE) - rows))
    return _scaled(padded, scale, TILE)[:rows, :cols].to(dtype)


def _check_scale_shape(scale: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(scale.shape) != expected:
        raise ValueError(f"{what} scales have shape {list(scale.shape)}; the FP8 data needs {list(expected)}")


# ------------------------------------------------------------------------------------------------ GEMMs


def emulated_mm(a: Operand, b: Operand) -> torch.Tensor:
    """a·bᵀ in fp32 [a.rows, b.rows] over the shared (padded) K: both operands dequantized, each 128-long
    chunk of K multiplied on its own (one batch entry of a bmm) and the chunks' partial products summed
    in fp32, as the tensor cores' partial sums are promoted to FP32 every N_C = 128."""
    m, n, chunks = a.rows, b.rows, a.q.shape[1] // TILE
    da = dequantize_operand(a)[:m].view(m, chunks, TILE).transpose(0, 1)     # [chunks, m, 128]
    db = dequantize_operand(b)[:n].view(n, chunks, TILE).permute(1, 2, 0)    # [chunks, 128, n]
    step = max(1, PARTIALS_BUDGET // max(1, m * n))  # chunks per bmm, so the partials stay within budget
    out = torch.bmm(da[:step], db[:step]).sum(dim=0)
    for c in range(step, chunks, step):
        out += torch.bmm(da[c:c + step], db[c:c + step]).sum(dim=0)
    return out


def cuda_mm(a: Operand, b: Operand, out_dtype: torch.dtype) -> torch.Tensor:
    """a·bᵀ through torch's blockwise-scaled FP8 GEMM. Operands must be padded to 128 rows (quantized
    with row_multiple=128). Scale layouts as torch documents them: a 1×128 operand's scales
    [rows, K/128] outer-dim-major (stride (1, rows)); a 128×128 operand's scales [L4, rows/128] with
    stride (1, L4), where L4 is the K-block count rounded up to 4. Not yet run on a GPU."""
    def scale_and_recipe(op: Operand):
        if op.block_rows == 1:
            return op.scale.t().contiguous().t(), F.ScalingType.BlockWise1x128
        k_blocks = op.scale.shape[1]
        padded = F.pad(op.scale, (0, _round_up(k_blocks, 4) - k_blocks), value=1.0)  # alignment only, unread
        return padded.t(), F.ScalingType.BlockWise128x128

    scale_a, recipe_a = scale_and_recipe(a)
    scale_b, recipe_b = scale_and_recipe(b)
    out = F.scaled_mm(a.q, b.q.t(), scale_a, recipe_a, scale_b, recipe_b, output_dtype=out_dtype)
    return out[:a.rows, :b.rows]


def _mm(a: Operand, b: Operand, backend: str, out_dtype: torch.dtype) -> torch.Tensor:
    if 0 in (a.rows, b.rows, a.q.shape[1]):  # no tokens (an idle expert): nothing for a GEMM kernel to do
        return a.q.new_zeros(a.rows, b.rows, dtype=out_dtype)
    if backend == "cuda":
        return cuda_mm(a, b, out_dtype)
    return emulated_mm(a, b).to(out_dtype)


# ------------------------------------------------------------------------------------------- FP8 linear


def _weight_to_keep(weight: torch.Tensor, w: Operand, resident: bool) -> tuple[torch.Tensor, ...]:
    """What backward keeps of a GEMM's weight: a resident one (a parameter or a view of one, e.g. an expert's
    slice) as it is, requantized in backward (deterministically the same); else the FP8 blocks of a weight made
    for the call (the stacked q_a/kv_a and gate/up: 1 byte an element instead of 4)."""
    return (weight,) if resident else (w.q, w.scale)


def _kept_weight(kept: list[torch.Tensor], out: int) -> Operand:
    return quantize_operand(kept[0], TILE) if len(kept) == 1 else Operand(*kept, out, TILE)


def _fprop(x2: torch.Tensor, weight: torch.Tensor, backend: str, out_dtype: torch.dtype, pow2: bool = False):
    """Fprop: x [tokens, in] in 1×128 tiles along in (pow2: power-of-2 scales), W in 128×128 blocks -> (x's operand,
    W's, y [tokens, out])."""
    qx = quantize_operand(x2, 1, TILE if backend == "cuda" else 1, pow2)
    w = quantize_operand(weight, TILE)
    return qx, w, _mm(qx, w, backend, out_dtype)


def _dgrad(g2: torch.Tensor, w: Operand, k: int, backend: str, dtype: torch.dtype) -> torch.Tensor:
    """Dgrad [tokens, k]: dy in 1×128 tiles along out; Wᵀ's blocks are W's, transposed."""
    wt = Operand(w.q.t().contiguous(), w.scale.t().contiguous(), k, TILE)
    gq = quantize_operand(g2, 1, TILE if backend == "cuda" else 1)
    return _mm(gq, wt, backend, dtype)


def _transposed_tiles(x_hat: torch.Tensor, backend: str) -> Operand:
    """xᵀ in 1×128 tiles along tokens, Wgrad's operand: x_hat [tokens, k] is the input as backward has it,
    dequantized from its FP8 tiles or recomputed from cached FP8 inputs."""
    return quantize_operand(x_hat.t(), 1, TILE if backend == "cuda" else 1)


def _wgrad(xt: Operand, g2: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """Wgrad [out, k] in `dtype`: reduce over tokens; dyᵀ in 1×128 tiles along tokens against xᵀ's."""
    gt = quantize_operand(g2.t(), 1, TILE if backend == "cuda" else 1)
    return _mm(gt, xt, backend, torch.float32).to(dtype)


def _file_or_run_wgrad(ctx, wgrad, weight_input: int = 1) -> torch.Tensor | None:
    """The weight gradient: filed with the zero-bubble W split's sink to run when the W op does, else now (if the
    weight, the autograd function's input number `weight_input`, wants one)."""
    if ctx.sink is not None:
        ctx.sink.file(wgrad)
        return None
    return wgrad() if ctx.needs_input_grad[weight_input] else None


class FP8Linear(torch.autograd.Function):
    """y = x·Wᵀ with the three GEMMs in FP8. Saved for backward: x's FP8 tiles and scales (not x), and the weight
    as `_weight_to_keep` says."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, backend: str, out_dtype: torch.dtype, resident: bool,
                sink=None, pow2: bool = False) -> torch.Tensor:
        qx, w, y = _fprop(x.reshape(-1, x.shape[-1]), weight, backend, out_dtype, pow2)
        ctx.save_for_backward(qx.q, qx.scale, *_weight_to_keep(weight, w, resident))
        ctx.backend, ctx.x_shape, ctx.x_dtype, ctx.sink = backend, x.shape, x.dtype, sink
        ctx.w_shape, ctx.w_dtype = weight.shape, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        xq, x_scale, *kept = ctx.saved_tensors
        (out, k), backend = ctx.w_shape, ctx.backend
        g2 = grad_y.reshape(-1, out)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _dgrad(g2, _kept_weight(kept, out), k, backend, ctx.x_dtype).reshape(ctx.x_shape)
        tokens = g2.shape[0]
        grad_w = _file_or_run_wgrad(ctx, lambda: _wgrad(_transposed_tiles(
            dequantize_operand(Operand(xq, x_scale, tokens, 1))[:tokens, :k], backend), g2, ctx.w_dtype, backend))
        return grad_x, grad_w, None, None, None, None, None


class FP8SwiGLULinear(torch.autograd.Function):
    """y = swiglu(gu)·Wᵀ: an FFN's down projection on its SwiGLU, under the report's rule for the SwiGLU's input
    (§3.3.2, "inputs of the SwiGLU operator in MoE"): backward keeps gu as E4M3 1×128 tiles and recomputes
    h = swiglu(gu) from them, for the down projection's Wgrad and the SwiGLU's own gradient. Nothing of h is kept,
    where the two ops apart would keep h's E4M3 tiles (FP8Linear) and gu in BF16 (the SwiGLU). The forward is
    FP8Linear's on the exact h, the same bits; backward sees gu as FP8 rounded it. gu's 1×128 tiles run along
    [gate | up]; where I is not a multiple of 128 (the tiny presets) a tile spans the two halves, which DeepSeek-V3's
    widths never do."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor, weight: torch.Tensor, swiglu, backend: str, out_dtype: torch.dtype,
                resident: bool, sink=None) -> torch.Tensor:
        _, w, y = _fprop(swiglu(gu).reshape(-1, weight.shape[1]), weight, backend, out_dtype)
        qgu = quantize_operand(gu.reshape(-1, gu.shape[-1]), 1)
        ctx.save_for_backward(qgu.q, qgu.scale, *_weight_to_keep(weight, w, resident))
        ctx.swiglu, ctx.backend, ctx.gu_shape, ctx.gu_dtype, ctx.sink = swiglu, backend, gu.shape, gu.dtype, sink
        ctx.w_shape, ctx.w_dtype = weight.shape, weight.dtype
        return y.reshape(*gu.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        guq, gu_scale, *kept = ctx.saved_tensors
        (out, k), backend = ctx.w_shape, ctx.backend
        rows, width = guq.shape[0], ctx.gu_shape[-1]
        gu_hat = dequantize_operand(Operand(guq, gu_scale, rows, 1))[:, :width].to(ctx.gu_dtype)
        g2 = grad_y.reshape(-1, out)
        grad_gu = grad_w = None
        wants_wgrad = ctx.sink is not None or ctx.needs_input_grad[1]
        if ctx.needs_input_grad[0]:
            gu_hat.requires_grad_()
            with torch.enable_grad():
                h = ctx.swiglu(gu_hat)
            dh = _dgrad(g2, _kept_weight(kept, out), k, backend, h.dtype)
            grad_gu = torch.autograd.grad(h, gu_hat, dh)[0].reshape(ctx.gu_shape)
            h = h.detach()
        elif wants_wgrad:
            h = ctx.swiglu(gu_hat)
        if wants_wgrad:
            # Wgrad's operand made now, so that a deferred W op holds h's E4M3 tiles (1 byte an element), not h
            xt = _transposed_tiles(h.float(), backend)
            grad_w = _file_or_run_wgrad(ctx, lambda: _wgrad(xt, g2, ctx.w_dtype, backend))
        return grad_gu, grad_w, None, None, None, None, None


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """F.linear's under autocast: BF16 even from an FP32 input (the residual stream's RMSNorm), so what follows the
    GEMM runs and saves for backward in BF16, as it does with FP8 off; else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _is_resident(weight: torch.Tensor) -> bool:
    """A parameter, or a view of a tensor that outlives the call (an expert's slice of the stacked experts), is
    kept for backward at no cost; a weight made for this call (a concatenation) is kept as its FP8 blocks."""
    return weight.is_leaf or weight._base is not None


def _check_call(x: torch.Tensor, features: int, weight: torch.Tensor, backend: str, what: str, x_is: str) -> None:
    if backend not in ("emulate", "cuda"):
        raise ValueError(f"{what} backend {backend!r}: expected 'emulate' or 'cuda'")
    if backend == "cuda" and not x.is_cuda:
        raise ValueError(f"{what} backend 'cuda' needs CUDA tensors; {x_is} is on {x.device}")
    if features != weight.shape[1]:
        raise ValueError(f"{what}: {x_is} has {features} input features, weight {list(weight.shape)} wants "
                         f"{weight.shape[1]}")


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, backend: str = "emulate", sink=None,
               pow2_scales: bool = False) -> torch.Tensor:
    """F.linear(x, weight) (no bias) in DeepSeek-V3's FP8 recipe. x [..., in] in any float dtype, weight
    [out, in] (an fp32 master or a bf16 copy); the output has the dtype F.linear's would have (autocast's, e.g.
    BF16, inside autocast; else x's), the input gradient x's, the weight gradient the weight's.
    backend: "emulate" (any device) or "cuda" (call `check_fp8_setting` once at start first). sink
    (`ops.WeightGradSink`, holding weight): backward files the Wgrad there instead of returning it. pow2_scales:
    x's tiles take power-of-2 scales (the routed experts' up projection, whose input arrives on that grid:
    `fp8_comm`)."""
    _check_call(x, x.shape[-1], weight, backend, "fp8_linear", "x")
    return FP8Linear.apply(x, weight if sink is None else weight.detach(), backend, _output_dtype(x),
                           _is_resident(weight), sink, pow2_scales)


def fp8_swiglu_linear(gu: torch.Tensor, weight: torch.Tensor, swiglu, backend: str = "emulate",
                      sink=None) -> torch.Tensor:
    """fp8_linear(swiglu(gu), weight) with the SwiGLU's input, not its output, kept for backward in FP8
    (`FP8SwiGLULinear`). gu [..., 2I] = [gate | up], weight [out, I]; `swiglu` the SwiGLU op to run and to
    recompute (`ops.swiglu`)."""
    if gu.shape[-1] % 2:
        raise ValueError(f"fp8_swiglu_linear: gu has {gu.shape[-1]} features, not [gate | up] of two equal halves")
    _check_call(gu, gu.shape[-1] // 2, weight, backend, "fp8_swiglu_linear", "swiglu(gu)")
    return FP8SwiGLULinear.apply(gu, weight if sink is None else weight.detach(), swiglu, backend,
                                 _output_dtype(gu), _is_resident(weight), sink)


# ------------------------------------------------------------------------------------------ the setting


def check_fp8_setting(setting: str, device: torch.device | str, dtype: str = "bfloat16") -> str:
    """Validates `train.fp8` for `device` and the compute dtype (`train.dtype`, resolved) at start; returns the
    backend it will use, in words (for the log). Raises ConfigError naming the field and the value that works."""
    if setting not in FP8_SETTINGS:
        raise ConfigError(f"train.fp8 = {setting!r}: expected one of {', '.join(map(repr, FP8_SETTINGS))}")
    if setting == "off":
        return "off (BF16/FP32 linears)"
    if torch.device(device).type == "cuda" and dtype not in ("bfloat16", "float16"):
        raise ConfigError(f"train.fp8 = {setting!r} on CUDA runs the attention core as flash attention "
                          f"(`fp8_attention`), which takes bfloat16, not train.dtype = {dtype!r}: set train.dtype = "
                          f"'bfloat16'")
    if setting == "emulate":
        choice = "emulate: E4M3 1x128/128x128 quantization, FP32 GEMMs with K promoted every 128"
        log.info("train.fp8 = 'emulate' -> %s", choice)
        return choice
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"train.fp8 = 'cuda' needs a CUDA device, but the run is on {device} (CUDA available: "
                          f"{torch.cuda.is_available()}); set train.fp8 = 'emulate' (same numerics, any device) "
                          f"or 'off'")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_FP8_CAPABILITY:
        raise ConfigError(f"train.fp8 = 'cuda': {torch.cuda.get_device_name(device)} has compute capability "
                          f"{capability[0]}.{capability[1]}, FP8 tensor cores need >= 8.9 (Ada, Hopper); set "
                          f"train.fp8 = 'emulate' or 'off'")
    problem = blockwise_scaled_mm_problem(device)
    if problem:
        raise ConfigError(f"train.fp8 = 'cuda': {problem}; set train.fp8 = 'emulate' (same numerics, slower)")
    choice = (f"cuda: torch blockwise scaled_mm (1x128 x 128x128 and 1x128 x 1x128, fp32 scales) on "
              f"{torch.cuda.get_device_name(device)}")
    log.info("train.fp8 = 'cuda' -> %s", choice)
    return choice


@functools.cache
def blockwise_scaled_mm_problem(device: torch.device) -> str | None:
    """None when torch's blockwise FP8 GEMM runs on `device` and agrees with the emulation on the two
    recipes the FP8 linear uses; otherwise why not. Rows get distinct magnitudes so a scale read in the
    wrong layout shows as a large error."""
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with blockwise recipes"
    gen = torch.Generator().manual_seed(0)

    def data(rows: int, cols: int) -> torch.Tensor:
        magnitudes = torch.logspace(-3, 3, rows).view(-1, 1)[torch.randperm(rows, generator=gen)]
        return (torch.randn(rows, cols, generator=gen) * magnitudes).to(device)

    try:
        for a_block, b_block in ((1, TILE), (1, 1)):
            a = quantize_operand(data(256, 384), a_block, TILE)
            b = quantize_operand(data(384, 384), b_block, TILE)
            got, want = cuda_mm(a, b, torch.float32), emulated_mm(a, b)
            err = ((got - want).norm() / want.norm()).item()
            if not err < 1e-2:  # a misread scale layout is O(1) off here; TF32 in the emulation is 1e-3
                return f"blockwise scaled_mm ({a_block}x128 x {b_block}x128) differs from the emulation by {err:.2e}"
    except (RuntimeError, NotImplementedError, ValueError) as e:
        return f"blockwise scaled_mm failed ({type(e).__name__}: {str(e).splitlines()[0]})"
    return None
