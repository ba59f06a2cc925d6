"""Training throughput: sourcelm's trainer vs transformers' DeepseekV3ForCausalLM, same config.

Both train the `tiny` preset (or --preset) on batches of 8 × 256 tokens with AdamW(0.9, 0.95,
wd 0.1 on matrices) and gradient clipping at 1.0. Each measurement is a fresh subprocess (so peak
RSS is that trainer's alone), and the two alternate for --rounds rounds so machine noise hits both
alike. sourcelm runs its real loop (`Trainer.train_step`: loader, balance update, metrics); it also
computes the MTP block and loss, which HF's model does not have — extra work on our side only.

    .venv/bin/python bench/train_throughput.py [--rounds 3 --steps 8 --dtype float32]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def make_shards(root: Path, vocab: int, tokens: int = 400_000) -> Path:
    from sourcelm.tokens.indexed import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(root / "train" / "shard_00000") as w:
        done = 0
        while done < tokens:
            n = int(rng.integers(200, 2000))
            w.add_document(rng.integers(2, vocab, n).astype(np.uint16))
            done += n
    return root / "train"


def run_sourcelm(args) -> dict:
    from sourcelm.config import load_config
    from sourcelm.train.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        data = make_shards(Path(tmp), load_config(args.preset).model.vocab_size)
        cfg = load_config(args.preset, [
            f"data.train=['{data}']", f"data.seq_len={args.seq}", f"schedule.global_batch={args.batch}",
            f"schedule.micro_batch={args.batch}", f"schedule.steps={args.warmup + args.steps}",
            "checkpoint.every=100000", "logging.tensorboard=false", "logging.progress=false", "logging.valid_every=0",
            f"train.dtype={args.dtype}", f"model.moe_impl={args.moe_impl}"])
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        for _ in range(args.warmup):
            trainer.train_step()
        start = time.perf_counter()
        for _ in range(args.steps):
            trainer.train_step()
        elapsed = time.perf_counter() - start
        return {"tokens_per_s": args.steps * args.batch * args.seq / elapsed, "flops_per_token": trainer.flops_per_token,
                "peak_flops": trainer.peak_flops}


def run_hf(args) -> dict:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from sourcelm.config import load_config

    mcfg = load_config(args.preset).model
    hf_cfg = DeepseekV3Config(**{k: v for k, v in mcfg.to_hf_dict().items() if k not in ("architectures",)})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)

    def step():
        batch = torch.randint(2, mcfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])  # HF shifts labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": args.steps * args.batch * args.seq / elapsed}


def child(args) -> None:
    result = run_sourcelm(args) if args.child == "sourcelm" else run_hf(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--moe-impl", default="grouped", choices=["grouped", "loop"])
    p.add_argument("--child", choices=["sourcelm", "hf"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    results: dict[str, list[dict]] = {"sourcelm": [], "hf": []}
    forwarded = [a for a in sys.argv[1:]]
    for r in range(args.rounds):
        for who in ("sourcelm", "hf"):
            out = subprocess.run([sys.executable, __file__, *forwarded, "--child", who], capture_output=True, text=True,
                                 cwd=ROOT)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{who} failed:\n{out.stderr[-3000:]}")
            results[who].append(json.loads(line[7:]))
            print(f"round {r + 1} {who:9s} {results[who][-1]['tokens_per_s']:9.0f} tok/s  "
                  f"peak RSS {results[who][-1]['peak_rss_mb']:.0f} MB", flush=True)
    ours = statistics.median(x["tokens_per_s"] for x in results["sourcelm"])
    theirs = statistics.median(x["tokens_per_s"] for x in results["hf"])
    flops, peak = results["sourcelm"][0]["flops_per_token"], results["sourcelm"][0]["peak_flops"]
    print(f"\npreset {args.preset}, batch {args.batch} x {args.seq}, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"sourcelm     {ours:9.0f} tok/s (median of {args.rounds})  MFU {ours * flops / peak:.1%}  "
          f"peak RSS {max(x['peak_rss_mb'] for x in results['sourcelm']):.0f} MB")
    print(f"transformers {theirs:9.0f} tok/s (median of {args.rounds})  MFU {theirs * flops / peak:.1%}  "
          f"peak RSS {max(x['peak_rss_mb'] for x in results['hf']):.0f} MB")
    print(f"ratio sourcelm / transformers: {ours / theirs:.2f}x")


if __name__ == "__main__":
    main()
