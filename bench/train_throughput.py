"""Training throughput: sourcelm's trainer vs transformers' DeepseekV3ForCausalLM, same config.

Both train the `tiny` preset (or --preset) on batches of 8 × 256 tokens with AdamW(0.9, 0.95,
wd 0.1 on matrices) and gradient clipping at 1.0. Each measurement is a fresh subprocess (so peak
RSS is that trainer's alone), and all variants alternate, round after round, so machine noise hits
them alike; the figures are medians over the rounds. sourcelm runs its real loop
(`Trainer.train_step`: loader, balance update, metrics).

Variants (each in every compute dtype given by --dtypes):
  sourcelm      the preset as is: the MTP block and loss included, work HF's model does not do
  sourcelm-nomtp  model.num_nextn_predict_layers=0: the same work as HF's model (equal-work ratio)
  transformers  DeepseekV3ForCausalLM (sdpa attention, or --hf-attn eager), torch.optim.AdamW,
                torch.autocast for bf16 (with --hf-same-allocator, also the glibc tuning the trainer
                applies on the CPU; with --hf-compile, the model under torch.compile)

Both run one first step (which pays any compilation) and --warmup more before the timed steps.

Two rates per run: tokens per wall-clock second (what a user sees on a quiet machine), and tokens per
second of the process's own CPU time. On a machine shared with other jobs the first swings with their
load, the second much less (it still moves with cache and memory-bandwidth contention); with
--threads 1 it is the load-robust comparison. MFU: model FLOPs per token (`sourcelm.model.flops`;
with MTP for the first variant, without for the other two) × wall tokens/s over the peak measured by
the trainer's matmul probe for that dtype (itself slowed down on a loaded machine).

    .venv/bin/python bench/train_throughput.py [--rounds 3 --steps 8 --dtypes float32,bfloat16 --threads 2]
    .venv/bin/python bench/train_throughput.py --compile --dtypes float32   # train.compile=true; first step shown
    .venv/bin/python bench/train_throughput.py --hf-same-allocator          # fairness check for the allocator tuning
    .venv/bin/python bench/train_throughput.py --hf-attn eager              # HF with its materialised-scores attention
    .venv/bin/python bench/train_throughput.py --hf-compile                 # HF under torch.compile
"""

from __future__ import annotations

import argparse
import json
import os
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
VARIANTS = ("sourcelm", "sourcelm-nomtp", "transformers")


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


def _timed(step, args) -> dict:
    """Tokens per wall second, and per second of this process's CPU time (user + system, all threads):
    the second is barely moved by other processes time-slicing the cores, the first is."""
    for _ in range(args.warmup):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    tokens = args.steps * args.batch * args.seq
    return {"tokens_per_s": tokens / (time.perf_counter() - wall),
            "tokens_per_cpu_s": tokens / (time.process_time() - cpu)}


def run_sourcelm(args, dtype: str, mtp: bool) -> dict:
    from sourcelm.config import load_config
    from sourcelm.train.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        data = make_shards(Path(tmp), load_config(args.preset).model.vocab_size)
        overrides = [
            f"data.train=['{data}']", f"data.seq_len={args.seq}", f"schedule.global_batch={args.batch}",
            f"schedule.micro_batch={args.batch}", f"schedule.steps={args.warmup + args.steps}",
            "checkpoint.every=100000", "logging.tensorboard=false", "logging.progress=false", "logging.valid_every=0",
            f"train.dtype={dtype}", f"model.moe_impl={args.moe_impl}", f"train.compile={str(args.compile).lower()}"]
        if not mtp:
            overrides.append("model.num_nextn_predict_layers=0")
        cfg = load_config(args.preset, overrides)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, Path(tmp) / "run", progress=False)
        trainer.train_step()  # the first step pays any compilation
        first = time.perf_counter() - t0
        return {**_timed(trainer.train_step, args), "flops_per_token": trainer.flops_per_token,
                "peak_flops": trainer.peak_flops, "setup_and_first_step_s": first}


def run_hf(args, dtype: str) -> dict:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from sourcelm.config import load_config
    from sourcelm.model.flops import model_stats
    from sourcelm.train.device import keep_freed_cpu_memory

    if args.hf_same_allocator:
        keep_freed_cpu_memory()

    mcfg = load_config(args.preset).model
    hf_cfg = DeepseekV3Config(**{k: v for k, v in mcfg.to_hf_dict().items() if k not in ("architectures",)})
    hf_cfg._attn_implementation = args.hf_attn
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = DeepseekV3ForCausalLM(hf_cfg)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    other = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)

    def step():
        batch = torch.randint(2, mcfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        with torch.autocast("cpu", dtype=dt, enabled=dt != torch.float32):
            out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])  # HF shifts labels itself
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if args.hf_compile:
        model = torch.compile(model)
    step()  # the first step pays any compilation, as sourcelm's does
    first = time.perf_counter() - t0
    return {**_timed(step, args), "flops_per_token": model_stats(mcfg, args.seq, dtype)["flops_per_token"],
            "setup_and_first_step_s": first}


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child == "transformers":
        result = run_hf(args, args.child_dtype)
    else:
        result = run_sourcelm(args, args.child_dtype, mtp=args.child == "sourcelm")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes to measure")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each trainer (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="sourcelm with train.compile=true")
    p.add_argument("--hf-same-allocator", action="store_true",
                   help="give transformers the glibc tuning sourcelm's trainer applies (keep_freed_cpu_memory)")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"],
                   help="transformers' attention implementation")
    p.add_argument("--hf-compile", action="store_true", help="transformers' model under torch.compile")
    p.add_argument("--moe-impl", default="grouped", choices=["grouped", "loop"])
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-dtype", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    dtypes = args.dtypes.split(",")
    variants = args.variants.split(",")
    runs = [(v, d) for d in dtypes for v in variants]
    results: dict[tuple[str, str], list[dict]] = {r: [] for r in runs}
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for r in range(args.rounds):
        for who, dtype in runs:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", who, "--child-dtype", dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{who} {dtype} failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[7:])
            res["load_average_1m"] = os.getloadavg()[0]
            results[(who, dtype)].append(res)
            print(f"round {r + 1} {who:15s} {dtype:9s} {res['tokens_per_s']:8.0f} tok/s "
                  f"{res['tokens_per_cpu_s']:8.0f} tok/CPU-s  "
                  f"peak RSS {res['peak_rss_mb']:5.0f} MB  load {res['load_average_1m']:.1f}", flush=True)
    print(f"load average at end: {os.getloadavg()}")
    threads = results[runs[0]][0]["threads"]
    print(f"\npreset {args.preset}, batch {args.batch} x {args.seq}, {threads} threads, median of {args.rounds} rounds"
          f"{', sourcelm compiled' if args.compile else ''}{', transformers compiled' if args.hf_compile else ''}")
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in results.items()}
    med_cpu = {k: statistics.median(x["tokens_per_cpu_s"] for x in v) for k, v in results.items()}
    peaks = {d: results[(v, d)][0]["peak_flops"] for v, d in runs if v != "transformers"}
    for who, dtype in runs:
        res = results[(who, dtype)]
        mfu = f"MFU {med[(who, dtype)] * res[0]['flops_per_token'] / peaks[dtype]:6.1%}" if dtype in peaks else ""
        spread = f"[{min(x['tokens_per_s'] for x in res):.0f}..{max(x['tokens_per_s'] for x in res):.0f}]"
        print(f"{who:15s} {dtype:9s} {med[(who, dtype)]:8.0f} tok/s {spread:15s} {med_cpu[(who, dtype)]:8.0f} tok/CPU-s"
              f"  {mfu}  peak RSS {max(x['peak_rss_mb'] for x in res):5.0f} MB")
    firsts = {k: statistics.median(x["setup_and_first_step_s"] for x in v) for k, v in results.items()
              if "setup_and_first_step_s" in v[0]}
    print("setup + first step (compilation included): "
          + ", ".join(f"{w} {d} {t:.1f} s" for (w, d), t in firsts.items()))
    for label, m in (("wall-clock tokens/s", med), ("tokens per CPU-second", med_cpu)):
        hf = {d: m[("transformers", d)] for d in dtypes if ("transformers", d) in m}
        if not hf:
            continue
        best_d = max(hf, key=hf.get)
        print(f"\nratios on {label} (transformers' best: {best_d}, {hf[best_d]:.0f})")
        for who, dtype in runs:
            if who == "transformers":
                continue
            same = f"{m[(who, dtype)] / hf[dtype]:5.2f}x vs transformers {dtype}" if dtype in hf else ""
            print(f"  {who:15s} {dtype:9s} {same}   {m[(who, dtype)] / hf[best_d]:5.2f}x vs transformers' best")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{w}/{d}": v for (w, d), v in results.items()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
