"""`sourcelm info CONFIG_OR_PRESET [--json]`: a model's size, FLOPs and KV-cache cost."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, activated parameters, training FLOPs and KV cache per token")
    p.add_argument("config", help="preset name, TOML file, or HF model dir / config.json")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (presets and TOML only)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length for the attention FLOPs (default: data.seq_len, or 4096 for HF configs)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="KV-cache dtype (default: train.dtype, or the config's torch_dtype, or bfloat16)")
    p.set_defaults(func=run_info)


def _resolve(source: str, overrides: list[str]):
    """(ModelConfig, default seq_len, default dtype) from a preset / TOML or an HF config."""
    from sourcelm.config import load_config, load_model_config

    path = Path(source)
    hf_json = path / "config.json" if path.is_dir() else path
    if hf_json.suffix == ".json" and hf_json.exists():
        hf = json.loads(hf_json.read_text())
        dtype = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
        cfg = load_model_config(hf_json)
        return cfg, min(4096, cfg.max_position_embeddings), dtype if dtype in ("float32", "bfloat16", "float16") \
            else "bfloat16"
    from sourcelm.kernels.hardware import resolve_device, resolve_dtype

    full = load_config(source, overrides)
    return full.model, full.data.seq_len, resolve_dtype(full.train.dtype, resolve_device(full.train.device))


def run_info(args) -> int:
    from sourcelm.model.flops import model_stats

    cfg, seq_len, dtype = _resolve(args.config, args.overrides)
    stats = model_stats(cfg, seq_len=args.seq_len or seq_len, dtype=args.dtype or dtype)
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.config}", show_header=False)
    rows = [
        ("total parameters (main model)", _human(stats["total_params"], "B")),
        ("activated per token", _human(stats["active_params"], "B")),
        ("MTP module parameters", _human(stats["mtp_params"], "B")),
        (f"training FLOPs / token (seq {stats['seq_len']})", _human(stats["flops_per_token"]) + "FLOP"),
        ("  + MTP", _human(stats["mtp_flops_per_token"]) + "FLOP"),
        (f"KV cache / token ({stats['dtype']})", f"{stats['kv_cache_bytes_per_token']:,} B"),
        ("MoE layers (incl. MTP)", str(stats["moe_layers"])),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    return 0


def _human(n: float, billion: str = "G") -> str:
    for unit, scale in (("T", 1e12), (billion, 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} "
