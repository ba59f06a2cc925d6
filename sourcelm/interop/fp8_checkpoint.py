"""The FP8 layout DeepSeek released DeepSeek-V3 in: read (dequantize) and write (quantize).

On disk, each FP8 matrix `X.weight` is float8_e4m3fn [out, in] and comes with `X.weight_scale_inv`,
float32 [ceil(out/128), ceil(in/128)]: one dequantization factor per 128×128 block, the edge blocks
partial (576-row `kv_a_proj_with_mqa` has 5 block rows), so weight = fp8 value × its block's scale.
`config.json` carries `quantization_config` = QUANTIZATION_CONFIG; "dynamic" activations means the
activation scales are computed at run time, so loading ignores that field.

Which tensors are FP8 follows the released index: every projection of attention (q_a/q_b or q, kv_a,
kv_b, o) and of the FFNs (dense MLP, routed experts, shared experts), in the main layers and the MTP
block alike. The rest stays in the export dtype (BF16 in the release): the embedding and its MTP copy,
the output head and MTP `shared_head.head`, every norm, the router's `mlp.gate.weight`, MTP `eh_proj`
(serving engines build it as a plain BF16 linear), and `e_score_correction_bias` in FP32.
"""

from __future__ import annotations

import re

import torch

from sourcelm.kernels.fp8 import E4M3, TILE, dequantize_blocks, quantize_blocks

SCALE_SUFFIX = "_scale_inv"  # "X.weight" -> "X.weight_scale_inv"
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [TILE, TILE]}
FP8_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                        r"o_proj)|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")


def is_fp8_weight(hf_name: str) -> bool:
    """Whether the released checkpoint stores this HF tensor in FP8 (with a `weight_scale_inv`)."""
    return FP8_WEIGHT.fullmatch(hf_name) is not None


def fp8_weights_and_scales(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The FP8 tensors of an export: for each weight the release keeps in FP8, the e4m3 weight (on the
    CPU) and its fp32 block scales, quantized from the values given (pass full precision)."""
    out = {}
    for name, tensor in hf.items():
        if is_fp8_weight(name):
            out[name], out[name + SCALE_SUFFIX] = (t.cpu() for t in quantize_blocks(tensor.detach()))
    return out


def check_quantization_config(quantization: dict, where) -> None:
    """Refuses, naming the field, any quantization but the block-FP8 E4M3 layout read here."""
    method = quantization.get("quant_method")
    if method != "fp8":
        raise ValueError(f"{where}: quantization_config.quant_method = {method!r}; only DeepSeek's block FP8 "
                         f"('fp8') is read; dequantize the checkpoint to bf16/fp32 first")
    fmt = quantization.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"{where}: quantization_config.fmt = {fmt!r}; only 'e4m3' is read")
    block = list(quantization.get("weight_block_size") or [])
    if block != [TILE, TILE]:
        raise ValueError(f"{where}: quantization_config.weight_block_size = {block}; only [{TILE}, {TILE}] is read")


def dequantize_hf_tensors(hf: dict[str, torch.Tensor], where) -> dict[str, torch.Tensor]:
    """Each `X.weight` (e4m3) + `X.weight_scale_inv` pair becomes the fp32 weight; other tensors pass
    through. Every damaged pair (wrong scale shape or dtype, non-finite scales, a weight without its
    scale or a scale without its weight) is named, all of them in one error."""
    problems, out = [], {}
    scaled = {name.removesuffix(SCALE_SUFFIX) for name in hf if name.endswith(SCALE_SUFFIX)}
    for name, tensor in hf.items():
        if name.endswith(SCALE_SUFFIX):
            if name.removesuffix(SCALE_SUFFIX) not in hf:
                problems.append(f"{name} has no {name.removesuffix(SCALE_SUFFIX)} to scale")
        elif name in scaled:
            problem = _pair_problem(name, tensor, hf[name + SCALE_SUFFIX])
            if problem:
                problems.append(problem)
            else:
                out[name] = dequantize_blocks(tensor, hf[name + SCALE_SUFFIX].float())
        elif tensor.dtype == E4M3:
            problems.append(f"{name} is float8_e4m3fn but has no {name + SCALE_SUFFIX}")
        else:
            out[name] = tensor
    if problems:
        raise ValueError(f"{where}: damaged FP8 weights: " + "; ".join(problems))
    return out


def _pair_problem(name: str, weight: torch.Tensor, scale: torch.Tensor) -> str | None:
    if weight.dtype != E4M3 or weight.dim() != 2:
        return f"{name} is {weight.dtype} {list(weight.shape)}, expected a float8_e4m3fn matrix"
    expected = [-(-n // TILE) for n in weight.shape]
    if list(scale.shape) != expected:
        return (f"{name + SCALE_SUFFIX} has shape {list(scale.shape)}; {name} {list(weight.shape)} in "
                f"{TILE}x{TILE} blocks needs {expected}")
    if not scale.is_floating_point() or not torch.isfinite(scale).all():
        return f"{name + SCALE_SUFFIX} ({scale.dtype}) holds non-finite or non-float scales"
    return None
