"""`sourcelm export CHECKPOINT_DIR --hf OUT [--tokenizer DIR] [--dtype D] [--fp8]`.

A training checkpoint directory holds `model.safetensors` (the model's own state-dict names, fp32,
expert biases included) and `state.json` (key "config" = the resolved `Config`, optionally
"tokenizer_dir"). The export writes the HF DeepSeek-V3 layout (see `sourcelm.interop.hf`) and a
manifest that links it to the checkpoint's files.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a training checkpoint in the Hugging Face DeepSeek-V3 format")
    p.add_argument("checkpoint", help="checkpoint directory (model.safetensors + state.json)")
    p.add_argument("--hf", required=True, metavar="OUT", help="output directory")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory to copy (default: state.json's tokenizer_dir)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight dtype (default float32; bfloat16 with --fp8; e_score_correction_bias stays float32)")
    p.add_argument("--fp8", action="store_true",
                   help="DeepSeek's released layout: attention and FFN projections in FP8 E4M3 with 128x128 block "
                        "scales (weight_scale_inv), the rest in --dtype")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, in GB")
    p.set_defaults(func=run_export)


def load_checkpoint_model(ckpt: Path):
    """(model, Config, state.json dict) from a training checkpoint directory."""
    from sourcelm.config import config_from_dict
    from sourcelm.model import build_model
    from sourcelm.train.checkpoint import load_checkpoint

    tensors, _, state = load_checkpoint(ckpt)  # refuses a checkpoint whose files fail their hashes
    config = config_from_dict(state["config"])
    model = build_model(config.model, seed=None)
    model.load_state_dict(tensors, strict=True)
    return model, config, state


def run_export(args) -> int:
    import torch

    from sourcelm.artifacts import write_manifest
    from sourcelm.interop.hf import save_hf

    ckpt, out = Path(args.checkpoint), Path(args.hf)
    for name in ("state.json", "model.safetensors"):
        if not (ckpt / name).is_file():
            raise SystemExit(f"{ckpt}: no {name}; expected a checkpoint directory written by `sourcelm train`")
    model, config, state = load_checkpoint_model(ckpt)
    tokenizer = args.tokenizer or state.get("tokenizer_dir")
    if tokenizer and not Path(tokenizer).is_absolute() and not Path(tokenizer).exists():
        tokenizer = str(ckpt / tokenizer)
    dtype_name = args.dtype or ("bfloat16" if args.fp8 else "float32")
    files = save_hf(model, out, tokenizer_dir=tokenizer, dtype=getattr(torch, dtype_name),
                    max_shard_bytes=int(args.max_shard_gb * 1e9), fp8=args.fp8)
    inputs = [ckpt / "state.json", ckpt / "model.safetensors"]
    upstream = [ckpt / "manifest.json"] + ([Path(tokenizer) / "manifest.json"] if tokenizer else [])
    inputs += [p for p in upstream if p.is_file()]  # the checkpoint's and tokenizer's own manifests, when present
    write_manifest(out, "export", outputs=files, inputs=inputs, config=config.to_dict(),
                   extra={"format": "hf-deepseek-v3", "dtype": dtype_name, "fp8": args.fp8, "tokenizer_dir": tokenizer})
    print(f"exported {ckpt} -> {out} ({len(files)} files, {dtype_name}{' + fp8 e4m3 blocks' if args.fp8 else ''})")
    return 0
