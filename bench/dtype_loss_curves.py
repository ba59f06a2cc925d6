"""Does bf16 autocast keep the loss curve within seed-to-seed noise of fp32? (issue 3, "Mixed precision")

Trains the `tiny` preset for its 200 steps on real token shards once per (compute dtype, seed), two
runs at a time with one thread each, then compares: for each dtype the validation loss at every
evaluation (mean and spread over seeds), the final validation loss, and the train loss averaged over
the last 20 steps. The verdict line says whether the bf16-fp32 gap in final validation loss is inside
the seed-to-seed spread of fp32.

    .venv/bin/python bench/dtype_loss_curves.py --train TOKENS/train --valid TOKENS/valid --out /tmp/curves
    .venv/bin/python bench/dtype_loss_curves.py --out /tmp/curves --summarise-only   # runs already there
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_dir(out: Path, dtype: str, seed: int) -> Path:
    return out / f"{dtype}_s{seed}"


def launch(args, dtype: str, seed: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sourcelm", "train", args.preset, f"data.train=['{args.train}']",
           f"data.valid=['{args.valid}']", "logging.valid_every=25", "checkpoint.every=1000",
           "logging.tensorboard=false", "logging.progress=false", f"seed={seed}", f"train.dtype={dtype}",
           "--run-dir", str(run_dir(args.out, dtype, seed)), "--no-resume"]
    log = open(args.out / f"{dtype}_s{seed}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def read_run(path: Path) -> dict:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind", "train") == "train" and "loss" in r]
    valid = {r["step"]: r["valid_loss"] for r in rows if r.get("valid_loss") is not None}
    return {"steps": len(train), "main_loss": [r["main_loss"] for r in train], "valid": valid}


def summarise(out: Path, dtypes: list[str], seeds: list[int]) -> dict:
    runs = {(d, s): read_run(run_dir(out, d, s)) for d in dtypes for s in seeds}
    summary = {}
    for d in dtypes:
        finals = [runs[(d, s)]["valid"][max(runs[(d, s)]["valid"])] for s in seeds]
        tails = [statistics.mean(runs[(d, s)]["main_loss"][-20:]) for s in seeds]
        summary[d] = {"final_valid": finals, "train_last20": tails,
                      "valid_curve": {step: [runs[(d, s)]["valid"][step] for s in seeds]
                                      for step in sorted(runs[(d, seeds[0])]["valid"])}}
    print(f"{'dtype':9s} " + "  ".join(f"seed {s}" for s in seeds) + "   mean   (final validation loss)")
    for d in dtypes:
        f = summary[d]["final_valid"]
        print(f"{d:9s} " + "  ".join(f"{x:6.3f}" for x in f) + f"   {statistics.mean(f):.3f}")
    print("\nvalidation loss by step (mean over seeds [min..max])")
    for step in summary[dtypes[0]]["valid_curve"]:
        cells = []
        for d in dtypes:
            v = summary[d]["valid_curve"][step]
            cells.append(f"{d} {statistics.mean(v):.3f} [{min(v):.3f}..{max(v):.3f}]")
        print(f"  step {step:4d}  " + "   ".join(cells))
    if "float32" in summary and "bfloat16" in summary:
        ref, test = summary["float32"]["final_valid"], summary["bfloat16"]["final_valid"]
        paired = [b - a for a, b in zip(ref, test)]  # same seed: same init and data order
        gap = statistics.mean(paired)
        spread = max(ref) - min(ref)
        within = abs(gap) <= spread
        print("\nbf16 - fp32 final validation loss per seed: " + ", ".join(f"{x:+.3f}" for x in paired)
              + (f" (std {statistics.stdev(paired):.3f})" if len(paired) > 1 else ""))
        print(f"mean {gap:+.3f}; fp32 seed-to-seed spread (max - min): {spread:.3f}"
              f" -> {'within' if within else 'NOT within'} seed noise")
        summary["verdict"] = {"paired_gaps": paired, "gap": gap, "fp32_spread": spread, "within_noise": within}
    plot(summary, dtypes, out / "dtype_loss_curves.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def plot(summary: dict, dtypes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for d, color in zip(dtypes, ("tab:blue", "tab:red", "tab:green")):
        curve = summary[d]["valid_curve"]
        steps = sorted(curve)
        for i in range(len(next(iter(curve.values())))):
            ax.plot(steps, [curve[s][i] for s in steps], color=color, alpha=0.7, label=d if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("tiny preset: fp32 vs bf16 autocast, one line per seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", help="train token shard dir")
    p.add_argument("--valid", help="validation token shard dir")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--summarise-only", action="store_true")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    dtypes = args.dtypes.split(",")
    if not args.summarise_only:
        if not (args.train and args.valid):
            sys.exit("--train and --valid are required unless --summarise-only")
        args.out.mkdir(parents=True, exist_ok=True)
        todo = [(d, s) for s in seeds for d in dtypes]
        running: list[subprocess.Popen] = []
        while todo or running:
            while todo and len(running) < args.parallel:
                running.append(launch(args, *todo.pop(0)))
            running[0].wait()
            if running[0].returncode:
                sys.exit(f"a training run failed (exit {running[0].returncode}); see the logs in {args.out}")
            running.pop(0)
    summarise(args.out, dtypes, seeds)


if __name__ == "__main__":
    main()
