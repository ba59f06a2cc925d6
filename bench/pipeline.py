"""Pipeline schedules measured: tokens/s, the bubble each rank sees, and the activation states it holds, for 1F1B
and DualPipeV at P = 2 and 4, next to the report's Table 2 formulas and the schedule simulator fed with the measured
F and B.

Each layout is a real `sourcelm train` run (gloo, one process per pipeline rank) of an 8-layer model; the trainer's
metrics carry, per rank and step, the compute seconds of its F and B ops, the seconds its receives waited, and the
most micro-batch chunk states it held at once (`sourcelm/train/pipeline.py`). The bubble measured is a rank's step
time less its compute; the formulas take the measured mean F and B of one op (one chunk): 1F1B (P-1)(F+B) with a
chunk = a stage; DualPipeV (P_stages/2 - 1)(F&B + B - 3W) over its 2P stages, with F&B = F + B (a pair runs F then B
here) and W = 0 (no zero-bubble split). The simulator (`pipeline_sim.simulate`) runs each rank's op list with the
measured F and B and free communication.

On a machine with fewer cores than ranks, the ranks share cores, so a rank's "bubble" also holds time spent waiting
for a core (the output says how many cores there were).

    .venv/bin/python bench/pipeline.py [--steps 6 --layers 8 --hidden 128 --seq 128 --global-batch 16 --max-pp 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sourcelm.plan import pipeline_sim  # noqa: E402

LAYOUTS = [(1, "1f1b"), (2, "1f1b"), (2, "dualpipev"), (4, "1f1b"), (4, "dualpipev")]


def make_tokens(root: Path, vocab: int) -> None:
    import numpy as np

    from sourcelm.tokens.indexed import ShardWriter

    rng = np.random.default_rng(0)
    for split, n_docs in (("train", 400), ("valid", 10)):
        with ShardWriter(root / split / "shard_00000") as w:
            for _ in range(n_docs):
                start, stride, length = rng.integers(2, vocab), rng.integers(1, 4), rng.integers(50, 400)
                w.add_document(((start + stride * np.arange(length)) % (vocab - 2) + 2).astype(np.uint16).tolist()
                               + [1])


def run(args, root: Path, pp: int, kind: str) -> list[dict]:
    run_dir = root / f"pp{pp}_{kind}"
    overrides = [f"model.num_hidden_layers={args.layers}", f"model.hidden_size={args.hidden}",
                 f"model.vocab_size={args.vocab}", f"data.seq_len={args.seq}", f"schedule.steps={args.steps}",
                 f"schedule.global_batch={args.global_batch}", "schedule.micro_batch=1", "checkpoint.every=1000",
                 "logging.valid_every=0", "logging.tensorboard=false", "logging.progress=false",
                 f"data.train=['{root / 'tokens' / 'train'}']", f"parallel.pp={pp}", f"parallel.pp_schedule={kind}"]
    cmd = [sys.executable, "-m", "sourcelm", "train", "tiny", *overrides, "--run-dir", str(run_dir)]
    if pp > 1:
        cmd += ["--nproc", str(pp), "--ranks-per-node", str(pp)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def summarise(records: list[dict], pp: int, kind: str, micro_batches: int, warm: int) -> dict:
    timed = records[warm:]
    out = {"pp": pp, "schedule": kind, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed)}
    if pp == 1:
        return out
    ranks = range(pp)
    per = {k: [statistics.mean(r[k][i] for r in timed) for i in ranks]
           for k in ("pp_step_s", "pp_busy_s", "pp_wait_s", "pp_f_ms", "pp_b_ms", "pp_in_flight", "peak_rss_mb")}
    f = statistics.mean(per["pp_f_ms"]) / 1e3
    b = statistics.mean(per["pp_b_ms"]) / 1e3
    bubble = [s - c for s, c in zip(per["pp_step_s"], per["pp_busy_s"])]
    if kind == "1f1b":
        formula = (pp - 1) * (f + b)
        activations = pp  # Table 2's activation column: micro-batches held per device
    else:
        formula = (2 * pp / 2 - 1) * ((f + b) + b)
        activations = 2 * pp + 1  # PP + 1 over DualPipeV's 2P stages
    # a pair's F then its B, each when its own input is in: what the executor runs (no overlap inside a pair)
    sim = pipeline_sim.simulate(pipeline_sim.trainer_schedule(kind, pp, micro_batches, overlap_pairs=False),
                                pipeline_sim.ChunkTimes(f, b))
    out.update(f_ms=1e3 * f, b_ms=1e3 * b, f_ms_per_rank=per["pp_f_ms"], b_ms_per_rank=per["pp_b_ms"],
               bubble_s=bubble, bubble_mean_s=statistics.mean(bubble),
               formula_s=formula, simulated_s=statistics.mean(r.idle for r in sim.ranks), wait_s=per["pp_wait_s"],
               in_flight=per["pp_in_flight"], table2_activations=activations, peak_rss_mb=per["peak_rss_mb"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warm", type=int, default=2, help="steps left out of the figures")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--max-pp", type=int, default=4, help="leave out layouts with more pipeline ranks (cores)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    print(f"{os.cpu_count()} cores; {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
          f"{args.global_batch} micro-batches of 1 per step, {args.steps} steps ({args.warm} left out)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tokens(root / "tokens", args.vocab)
        for pp, kind in [(pp, kind) for pp, kind in LAYOUTS if pp <= args.max_pp]:
            rows.append(summarise(run(args, root, pp, kind), pp, kind, args.global_batch, args.warm))
            r = rows[-1]
            if pp == 1:
                print(f"1 process                 {r['tokens_per_s']:8.0f} tok/s")
                continue
            print(f"PP {pp} {kind:10s}          {r['tokens_per_s']:8.0f} tok/s  F {r['f_ms']:6.1f} ms  "
                  f"B {r['b_ms']:6.1f} ms (per rank F {', '.join(f'{x:.1f}' for x in r['f_ms_per_rank'])}; B "
                  f"{', '.join(f'{x:.1f}' for x in r['b_ms_per_rank'])})  bubble {r['bubble_mean_s']:.3f} s (per rank "
                  f"{', '.join(f'{x:.3f}' for x in r['bubble_s'])})  formula {r['formula_s']:.3f} s  "
                  f"simulated {r['simulated_s']:.3f} s  in flight {r['in_flight']} (Table 2: "
                  f"{r['table2_activations']})  peak RSS {', '.join(f'{x:.0f}' for x in r['peak_rss_mb'])} MB")
    for pp in sorted({r["pp"] for r in rows} - {1}):
        one, dual = (next(r for r in rows if r["pp"] == pp and r["schedule"] == k) for k in ("1f1b", "dualpipev"))
        print(f"PP {pp}: DualPipeV's bubble / 1F1B's = {dual['bubble_mean_s'] / one['bubble_mean_s']:.2f} "
              f"(simulated {dual['simulated_s'] / one['simulated_s']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
