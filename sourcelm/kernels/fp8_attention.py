"""The attention core and its output projection under FP8, with the core's output kept once, in E5M6 (report §3.3.2).

The o_proj input, the attention core's output O, is read by two backward passes: o_proj's weight gradient and the
attention core's own backward (flash attention's D = rowsum(dO ∘ O)). The report finds the latter sensitive to
precision and keeps this one activation in a custom 12-bit format, E5M6, in 1×128 tiles with power-of-2 scales,
instead of E4M3. `fp8_attention_output` runs the two ops as one autograd function so that O is kept exactly once,
in that format, and both backward passes read it:

  forward   O, lse = flash attention(q, k, v)          (BF16; lse the softmax statistics, FP32)
            y = O·Woᵀ                                   (FP8 Fprop: O in E4M3 1×128 tiles, Wo in 128×128 blocks)
            kept: q, k, v, lse, O as E5M6 tiles (1.5 bytes an element + one FP32 scale per 128), Wo as `fp8` keeps it
  backward  Ô = O from its E5M6 tiles
            dO = dy·Wo (FP8 Dgrad); dWo = dyᵀ·Ô (FP8 Wgrad, Ô requantized in E4M3 tiles along tokens)
            dq, dk, dv = flash attention backward(dO, q, k, v, Ô, lse)

where unfused, FP8 training would keep O twice: in BF16 for the core's backward and in E4M3 for o_proj's Wgrad.

E5M6: sign, five exponent bits (bias 15, the top exponent reserved for inf/NaN, subnormals below 2^-14), six
mantissa bits. Its values are the float16 values whose last four mantissa bits are zero, so a 12-bit code is a
float16's bit pattern shifted right by four; two codes pack into three bytes. A tile's scale is the smallest power
of 2 at or above amax / 65024 (E5M6's largest value), so a tile converts to another power-of-2 scale exactly (as
long as no value leaves E5M6's range), which is why the report makes these scales powers of 2 (it converts the
tiles to 128×1 for the Wgrad).

The attention core is torch's flash attention through its ATen ops (`_scaled_dot_product_flash_attention_for_cpu`
and its backward on CPU; `_scaled_dot_product_flash_attention` and its backward on CUDA, which take BF16/FP16): the
backward takes O as an argument, which is what lets it read Ô. MLA's values are narrower than its queries and keys,
so v is zero-padded to their width as `attention.sdpa_causal` does. Under FP8 this replaces `model.attn_impl`'s
choice (the CPU's "bmm" and AMX kernels keep the probabilities, not O). Has run on CPU only; the CUDA branch has not
run on a GPU yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sourcelm.kernels import fp8

E5M6_MAX = 65024.0  # (2 - 2^-6) · 2^15
E5M6_MIN_EXPONENT = -14  # of the smallest normal; below it the spacing stays 2^-20
_SCALE_FLOOR = E5M6_MAX * torch.finfo(torch.float32).tiny  # an all-zero tile gets a normal scale, as in `fp8`


# ------------------------------------------------------------------------------------------- E5M6 tiles


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2^exponent as fp32, exactly (exponent an int tensor within the normal range)."""
    return ((exponent.int() + 127) << 23).view(torch.float32)


def round_to_e5m6(v: torch.Tensor) -> torch.Tensor:
    """fp32 v (|v| <= E5M6_MAX) to the nearest E5M6 value, ties to even; inf and NaN stay as they are."""
    _, exponent = torch.frexp(v)  # |v| in [2^(exponent-1), 2^exponent)
    ulp = _pow2(exponent.clamp_min(E5M6_MIN_EXPONENT + 1) - 7)  # six mantissa bits below the leading one
    return torch.where(torch.isfinite(v), torch.round(v / ulp) * ulp, v)


def _tiles(x2: torch.Tensor) -> torch.Tensor:
    """x2 [R, K] -> fp32 [R, K padded to 128 / 128, 128], the pad zero-filled."""
    rows, k = x2.shape
    return F.pad(x2.float(), (0, -(-k // fp8.TILE) * fp8.TILE - k)).view(rows, -1, fp8.TILE)


def quantize_e5m6(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [R, K] in 1×128 tiles along K -> (packed codes uint8 [R, 3 · K padded / 2], power-of-2 scales fp32
    [R, K padded / 128]). A tile holding inf or NaN turns non-finite as a whole, as E4M3's tiles do."""
    tiles = _tiles(x2)
    amax = torch.maximum(tiles.amax(-1), tiles.amin(-1).neg())
    scale = fp8._pow2_ceil(amax.clamp_min(_SCALE_FLOOR) / E5M6_MAX)
    values = round_to_e5m6(tiles / scale[..., None]).view(x2.shape[0], -1)
    codes = (values.half().view(torch.int16).int() >> 4) & 0xFFF  # exact: E5M6 values are float16 values
    first, second = codes[:, 0::2], codes[:, 1::2]
    packed = torch.stack([first & 0xFF, (first >> 8) | ((second & 0xF) << 4), second >> 4], dim=-1)
    return packed.to(torch.uint8).view(x2.shape[0], -1), scale


def dequantize_e5m6(packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `quantize_e5m6`: fp32 [R, k]."""
    rows = packed.shape[0]
    b = packed.view(rows, -1, 3).int()
    first = b[..., 0] | ((b[..., 1] & 0xF) << 8)
    second = (b[..., 1] >> 4) | (b[..., 2] << 4)
    codes = torch.stack([first, second], dim=-1).view(rows, -1)
    bits = (codes << 4) - ((codes & 0x800) << 5)  # the float16 pattern, its sign bit as int16's
    values = bits.to(torch.int16).view(torch.float16).float().view(rows, -1, fp8.TILE)
    return (values * scale[..., None]).view(rows, -1)[:, :k]


# ------------------------------------------------------------------------------------ the attention core


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v_padded: torch.Tensor, scale: float):
    """Causal flash attention -> (O [B, heads, T, padded width], lse fp32, what the CUDA backward needs besides)."""
    if q.is_cuda:  # not yet run on a GPU
        if q.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"FP8 attention on CUDA runs flash attention, which takes bf16/fp16, not {q.dtype}: "
                             f"set train.dtype = 'bfloat16'")
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v_padded, 0.0, True, False, scale=scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v_padded, 0.0, True, scale=scale)
    return out, lse, ()


def _flash_backward(d_out, q, k, v_padded, out, lse, scale: float, cuda_state: tuple):
    """(dq, dk, dv padded) from O given, not recomputed: the backward reads Ô."""
    if q.is_cuda:
        cum_q, cum_k, max_q, max_k, seed, offset = cuda_state
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            d_out, q, k, v_padded, out, lse, cum_q, cum_k, max_q, max_k, 0.0, True, seed, offset, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        d_out, q, k, v_padded, out, lse, 0.0, True, scale=scale)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x


class FP8AttentionOutput(torch.autograd.Function):
    """y = o_proj(causal attention(q, k, v)) with O kept once, in E5M6 (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, weight, scale: float, backend: str, dtype: torch.dtype, resident: bool, sink=None):
        b, heads, t, dv = v.shape
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        out, lse, ctx.cuda_state = _flash_forward(q, k, _pad_to(v, q.shape[-1]), scale)
        o2 = out[..., :dv].transpose(1, 2).reshape(b * t, heads * dv)
        _, w, y = fp8._fprop(o2, weight, backend, dtype)
        packed, o_scale = quantize_e5m6(o2)
        ctx.save_for_backward(q, k, v, lse, packed, o_scale, *fp8._weight_to_keep(weight, w, resident))
        ctx.scale, ctx.backend, ctx.sink = scale, backend, sink
        ctx.w_shape, ctx.w_dtype = weight.shape, weight.dtype
        return y.view(b, t, weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        q, k, v, lse, packed, o_scale, *kept = ctx.saved_tensors
        b, heads, t, dv = v.shape
        (out_features, width), backend = ctx.w_shape, ctx.backend
        o_hat = dequantize_e5m6(packed, o_scale, width)  # [B·T, heads·dv] fp32
        g2 = grad_y.reshape(-1, out_features)
        grad_w = fp8._file_or_run_wgrad(ctx, lambda: fp8._wgrad(fp8._transposed_tiles(o_hat, backend), g2,
                                                                ctx.w_dtype, backend), weight_input=3)
        if not any(ctx.needs_input_grad[:3]):
            return None, None, None, grad_w, None, None, None, None, None
        d_o2 = fp8._dgrad(g2, fp8._kept_weight(kept, out_features), width, backend, q.dtype)

        def heads_first(x2):  # [B·T, heads·dv] -> [B, heads, T, qk width], zero-padded
            return _pad_to(x2.view(b, t, heads, dv).transpose(1, 2), q.shape[-1])

        dq, dk, dv_padded = _flash_backward(heads_first(d_o2), q, k, _pad_to(v, q.shape[-1]),
                                            heads_first(o_hat.to(q.dtype)), lse, ctx.scale, ctx.cuda_state)
        grads = (g.to(dt) for g, dt in zip((dq, dk, dv_padded[..., :dv]), ctx.input_dtypes))
        return *grads, grad_w, None, None, None, None, None


def fp8_attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, weight: torch.Tensor,
                         backend: str = "emulate", sink=None) -> torch.Tensor:
    """o_proj(causal softmax(scale · q kᵀ) v) under FP8: q, k [B, heads, T, D], v [B, heads, T, Dv], weight [out,
    heads · Dv] -> [B, T, out] in the compute dtype (autocast's, else q's); O kept once in E5M6. sink: as
    `fp8.fp8_linear`'s."""
    fp8._check_call(q, v.shape[1] * v.shape[-1], weight, backend, "fp8_attention_output", "the attention output")
    return FP8AttentionOutput.apply(q, k, v, weight if sink is None else weight.detach(), scale, backend,
                                    fp8._output_dtype(q), fp8._is_resident(weight), sink)
