"""The Hugging Face DeepSeek-V3 format, in and out.

Out (`save_hf`): `config.json` (HF field names, the official extras, the legacy `rope_theta` +
`rope_scaling` pair that transformers 4 and 5 both read), `generation_config.json`, sharded
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, per-expert keys
(`mlp.experts.{e}.{gate,up,down}_proj.weight`, readable by transformers 4/5, vLLM and SGLang),
`e_score_correction_bias` always in fp32, MTP depth k at `model.layers.{num_hidden_layers + k - 1}`
with copies of `embed_tokens` and `shared_head.head` as in the official checkpoint, and the tokenizer
files when given.

In (`load_hf`): per-expert or fused (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]) expert
layouts, either RoPE spelling (via `ModelConfig.from_hf_dict`), a single file or an index. MTP layers
present in the files are loaded; when a checkpoint has none (e.g. saved by transformers, which drops
them) the model is built without MTP and that is logged.

Both ways, the released FP8 layout (`weight_scale_inv` per 128×128 block, `quantization_config`):
`save_hf(..., fp8=True)` writes it, `load_hf` dequantizes it (`sourcelm.interop.fp8_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from sourcelm.artifacts import atomic_write_bytes
from sourcelm.config import ConfigError, ModelConfig
from sourcelm.interop.fp8_checkpoint import (
    QUANTIZATION_CONFIG,
    check_quantization_config,
    dequantize_hf_tensors,
    fp8_weights_and_scales,
)

log = logging.getLogger(__name__)

EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model")
INDEX_NAME = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------ naming


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF on-disk keys (views where possible; no copies of expert weights)."""
    n = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
        if m:
            name = f"model.layers.{n + int(m.group(1))}.{m.group(2)}"
        m = re.fullmatch(r"(.+\.mlp\.experts)\.(w1|w2|w3)", name)
        if m:
            for e in range(tensor.shape[0]):
                out[f"{m.group(1)}.{e}.{EXPERT_NAMES[m.group(2)]}.weight"] = tensor[e]
        else:
            out[name] = tensor
    for k in range(cfg.num_nextn_predict_layers):  # the official checkpoint stores copies of the shared modules
        out[f"model.layers.{n + k}.embed_tokens.weight"] = state["model.embed_tokens.weight"]
        out[f"model.layers.{n + k}.shared_head.head.weight"] = state["lm_head.weight"]
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF keys (per-expert or fused experts) -> our state dict. Extra keys (e.g. FP8 scales) are an error."""
    n = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for name, tensor in hf.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m and int(m.group(1)) >= n:
            rest = m.group(2)
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):
                continue  # copies of the shared embedding / head
            name = f"mtp.{int(m.group(1)) - n}.{rest}"
        m = re.fullmatch(r"(.+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight", name)
        if m:
            which = {v: k for k, v in EXPERT_NAMES.items()}[m.group(3)]
            experts.setdefault((m.group(1), which), {})[int(m.group(2))] = tensor
            continue
        m = re.fullmatch(r"(.+\.mlp\.experts)\.(gate_up_proj|down_proj)", name)
        if m:
            if m.group(2) == "down_proj":
                out[f"{m.group(1)}.w2"] = tensor
            else:
                inner = tensor.shape[1] // 2
                out[f"{m.group(1)}.w1"], out[f"{m.group(1)}.w3"] = tensor[:, :inner], tensor[:, inner:]
            continue
        out[name] = tensor
    for (prefix, which), by_id in experts.items():
        if sorted(by_id) != list(range(cfg.n_routed_experts)):
            missing = sorted(set(range(cfg.n_routed_experts)) - set(by_id))
            raise ValueError(f"{prefix}: experts {missing[:8]} missing for {which}")
        out[f"{prefix}.{which}"] = torch.stack([by_id[e] for e in range(cfg.n_routed_experts)])
    return out


# ---------------------------------------------------------------------------------------------- save


def save_hf(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None, dtype: torch.dtype = torch.float32,
            max_shard_bytes: int = 5 * 1024**3, fp8: bool = False) -> list[Path]:
    """Writes `model` (a DeepseekV3) in the HF DeepSeek-V3 format; returns the files written. fp8: the
    released FP8 layout (`sourcelm.interop.fp8_checkpoint`); the tensors it keeps unquantized take `dtype`."""
    from safetensors.torch import save_file

    cfg: ModelConfig = model.config
    check_routing_exportable(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    tensors = fp8_weights_and_scales(hf) if fp8 else {}  # quantized from the full-precision values
    for k, v in hf.items():
        if k not in tensors:
            keep_fp32 = k.endswith("e_score_correction_bias")
            tensors[k] = v.to("cpu", torch.float32 if keep_fp32 else dtype)

    # shards: keys in name order, a new shard when the next tensor would overflow
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    written, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        # safetensors refuses tensors sharing storage (the MTP copies) and non-contiguous views
        tmp = out_dir / f".{fname}.tmp"  # written whole, then renamed: no half-written shard under its name
        save_file({k: v.contiguous().clone() for k, v in shard.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_dir / fname)
        weight_map.update({k: fname for k in shard})
        written.append(out_dir / fname)
    for stale in out_dir.glob("model-*-of-*.safetensors"):  # shards of an earlier export into this folder
        if stale not in written:
            stale.unlink()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    written.append(_write_json(out_dir / INDEX_NAME, index))

    config = cfg.to_hf_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    written.append(_write_json(out_dir / "config.json", config))
    generation = {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                  "do_sample": False}
    written.append(_write_json(out_dir / "generation_config.json", generation))
    if tokenizer_dir is not None:
        written += copy_tokenizer(tokenizer_dir, out_dir)
    return written


def check_routing_exportable(cfg: ModelConfig) -> None:
    """Refuses a router that transformers would run differently. Its router (like the released inference code)
    scores every group by the sum of its top 2 biased affinities; a load always gets that rule back (the count is
    not part of config.json), so another count may only be exported where group scores choose nothing."""
    released = ModelConfig.RELEASED_GROUP_SCORE_TOPK
    per_group = cfg.n_routed_experts // cfg.n_group
    if per_group < released:
        raise ConfigError(
            f"model.n_group = {cfg.n_group} leaves {per_group} expert per group: transformers' router takes the top "
            f"{released} of every group and fails on such a model; export needs n_group <= n_routed_experts / 2")
    count = cfg.resolved_group_score_topk
    if count != released and 1 < cfg.n_group and cfg.topk_group < cfg.n_group:
        raise ConfigError(
            f"model.group_score_topk = {count}: transformers scores a group by its top {released} biased affinities, "
            f"so with n_group = {cfg.n_group} and topk_group = {cfg.topk_group} it would keep other groups than this "
            f"model was trained with; export only models with group_score_topk unset (the released rule)")


def copy_tokenizer(tokenizer_dir: str | Path, out_dir: Path) -> list[Path]:
    tokenizer_dir = Path(tokenizer_dir)
    found = [tokenizer_dir / f for f in TOKENIZER_FILES if (tokenizer_dir / f).is_file()]
    if not found:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    copied = []
    for src in found:
        shutil.copyfile(src, out_dir / src.name)
        copied.append(out_dir / src.name)
    return copied


def _write_json(path: Path, data: dict) -> Path:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return path


# ---------------------------------------------------------------------------------------------- load


def read_hf_tensors(in_dir: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    in_dir = Path(in_dir)
    index = in_dir / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in in_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{in_dir}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(in_dir / f)))
    return tensors


def load_hf(in_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A DeepseekV3 built from an HF DeepSeek-V3 directory (config.json + safetensors)."""
    from sourcelm.model import build_model

    in_dir = Path(in_dir)
    if not (in_dir / "config.json").is_file():
        raise FileNotFoundError(f"{in_dir}: no config.json; expected an HF DeepSeek-V3 directory (sourcelm export)")
    config = json.loads((in_dir / "config.json").read_text())
    quantization = config.get("quantization_config")
    if quantization:
        check_quantization_config(quantization, in_dir)
    cfg = ModelConfig.from_hf_dict(config)
    hf = read_hf_tensors(in_dir)
    if quantization:  # the released FP8 layout: weights dequantized to fp32 here
        hf = dequantize_hf_tensors(hf, in_dir)
    n = cfg.num_hidden_layers
    present = {int(m.group(1)) - n for k in hf
               if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) >= n}
    depth = len(present)
    if depth != cfg.num_nextn_predict_layers:
        log.warning("%s: config says %d MTP layers, the weights hold %d; building the model with %d",
                    in_dir, cfg.num_nextn_predict_layers, depth, depth)
        cfg.num_nextn_predict_layers = depth
    state = from_hf_state_dict(hf, cfg)
    for name in _expert_bias_names(cfg):
        if name not in state:  # non-V3 checkpoints: zeros mean "no correction"
            log.warning("%s missing; using zeros", name)
            state[name] = torch.zeros(cfg.n_routed_experts)
    model = build_model(cfg, seed=None, device=device)  # uninitialised: every value comes from the files
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{in_dir}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    model.to(dtype=dtype)
    return model


def _expert_bias_names(cfg: ModelConfig):
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            yield f"model.layers.{i}.mlp.gate.e_score_correction_bias"
    for k in range(cfg.num_nextn_predict_layers):
        yield f"mtp.{k}.mlp.gate.e_score_correction_bias"
