"""Pipeline schedules measured: tokens/s, the bubble each rank sees, the activation states it holds, and DualPipe's
F&B overlap, for 1F1B and DualPipeV at P = 2 and 4, next to the report's Table 2 formulas and the schedule
simulator fed with the measured F, B and F&B.

Each layout is a real `sourcelm train` run (gloo, P x EP processes) of an 8-layer model; the trainer's metrics carry,
per rank and step, the compute seconds of its ops, the seconds its pipeline receives and its all-to-alls waited, the
wall time of DualPipeV's F&B pairs, and the most micro-batch chunk states it held at once
(`sourcelm/train/pipeline.py`). DualPipeV runs twice: pairs in order (`parallel.pp_overlap=false`: F, then B) and
overlapped (the default: the B in a second thread, on its own process groups).

DualPipeV runs with the zero-bubble W split (the default, `parallel.pp_zero_bubble`: some B's compute only the input
gradients, Bi, and W ops compute the weight gradients later) and, overlapped, once without it.

The bubble measured is a rank's step time less its compute (for a pair, the time at least one of its two threads
computed); the formulas take the measured mean F, full B (inputs and weights; where none ran alone, a Bi plus its W)
and W of an op run alone (one chunk) and F&B of a pair: 1F1B (P-1)(F+B), a chunk = a stage; DualPipeV
(P_stages/2 - 1)(F&B + B - 3W) over its 2P stages, W = 0 without the split. The simulator (`plan.pipeline_sim`)
runs each rank's op list (pairs as one step of the measured F&B when overlapped) with free communication.

With --ep E each stage is E ranks of expert parallelism; --ranks-per-node sets the pretend nodes (default: one node
per stage); --links ib=RATE,nvlink=RATE runs every node in its own shaped network namespace (root), so that
communication takes real time and the overlap has something to hide.

On a machine with fewer cores than ranks, the ranks share cores, so a rank's "bubble" also holds time spent waiting
for a core (the output says how many cores there were), and two threads of a pair share the rank's core.

    .venv/bin/python bench/pipeline.py [--steps 6 --layers 8 --hidden 128 --seq 128 --global-batch 16 --max-pp 4]
    .venv/bin/python bench/pipeline.py --max-pp 2 --ep 2 --ranks-per-node 1 --links ib=200mbit,nvlink=640mbit
    .venv/bin/python bench/pipeline.py --max-pp 2 --layers 16 --hidden 256 --seq 256 --cut dualpipev:4,5,4,3
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline_trace  # noqa: E402

from sourcelm.plan import pipeline_sim  # noqa: E402

# (P, schedule, F&B pairs overlapped, zero-bubble W split)
LAYOUTS = [(1, "1f1b", False, False), (2, "1f1b", False, False), (2, "dualpipev", False, True),
           (2, "dualpipev", True, True), (2, "dualpipev", True, False), (4, "1f1b", False, False),
           (4, "dualpipev", False, True), (4, "dualpipev", True, True), (4, "dualpipev", True, False)]


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


def run(args, root: Path, pp: int, kind: str, overlap: bool, zb: bool) -> tuple[list[dict], Path]:
    run_dir = root / f"pp{pp}_{kind}_{overlap}_{zb}"
    overrides = [f"model.num_hidden_layers={args.layers}", f"model.hidden_size={args.hidden}",
                 f"model.vocab_size={args.vocab}", f"data.seq_len={args.seq}", f"schedule.steps={args.steps}",
                 f"schedule.global_batch={args.global_batch}", "schedule.micro_batch=1", "checkpoint.every=1000",
                 "logging.valid_every=0", "logging.tensorboard=false", "logging.progress=false",
                 f"data.train=['{root / 'tokens' / 'train'}']", f"parallel.pp={pp}", f"parallel.pp_schedule={kind}",
                 f"parallel.ep={args.ep}", f"parallel.pp_overlap={str(overlap).lower()}",
                 f"parallel.pp_zero_bubble={str(zb).lower()}"]
    chunks = 2 * pp if kind == "dualpipev" else pp
    overrides += [f"parallel.pp_layers=[{c.split(':')[1]}]" for c in args.cut
                  if c.split(":")[0] == kind and len(c.split(":")[1].split(",")) == chunks]
    cmd = [sys.executable, "-m", "sourcelm", "train", "tiny", *overrides, *args.set, "--run-dir", str(run_dir)]
    if pp * args.ep > 1:
        cmd += ["--nproc", str(pp * args.ep), "--ranks-per-node", str(args.ranks_per_node or args.ep)]
    if args.links:
        cmd += ["--links", args.links]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env=dict(os.environ, OMP_NUM_THREADS="1", SOURCELM_PIPELINE_TRACE=str(run_dir / "trace")))
    records = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return records, run_dir / "trace"


def summarise(records: list[dict], trace: Path, pp: int, kind: str, overlap: bool, zb: bool, micro_batches: int,
              warm: int) -> dict:
    timed = records[warm:]
    out = {"pp": pp, "schedule": kind, "overlap": overlap, "zero_bubble": zb,
           "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
           "a2a_bytes": statistics.mean(r.get("a2a_inter_node_bytes", 0) + r.get("a2a_intra_node_bytes", 0)
                                        for r in timed)}
    if pp == 1:
        return out
    keys = ("pp_step_s", "pp_busy_s", "pp_wait_s", "pp_f_ms", "ep_wait_s", "pp_in_flight", "peak_rss_mb")
    # per rank (every process), mean over the timed steps
    ranks = range(len(timed[0]["pp_step_s"]))
    per = {k: [statistics.mean(r[k][i] for r in timed) for i in ranks] for k in keys if k in timed[0]}
    steps = pipeline_trace.read(trace, warm)
    measured = pipeline_trace.MeasuredTimes.from_steps(steps)
    f, b, w = measured.mean("F"), measured.full_backward(), measured.mean("W") if zb else 0.0
    fb = measured.fb if kind == "dualpipev" else f + b
    bubble = [s - c for s, c in zip(per["pp_step_s"], per["pp_busy_s"])]
    if kind == "1f1b":
        formula = (pp - 1) * (f + b)
        activations = pp  # Table 2's activation column: micro-batches held per device
    else:
        formula = (2 * pp / 2 - 1) * (fb + b - 3 * w)
        activations = 2 * pp + 1  # PP + 1 over DualPipeV's 2P stages
    order = pipeline_sim.trainer_schedule(kind, pp, micro_batches, overlap_pairs=overlap, zero_bubble=zb)
    sim = pipeline_sim.simulate(order, pipeline_sim.ChunkTimes(f, b, w=w, fb=fb))  # the schedule's own bubble
    # the same order fed with each chunk's measured op times, the pairs' F&B and the measured message latency
    lat = pipeline_trace.latencies(steps)
    p2p = statistics.median(lat) if lat else 0.0
    measured_sim = pipeline_sim.simulate(order, measured, p2p=p2p)
    stage_of = {r: rec["stage"] for r, rec in steps[0].items()}
    # and each timed step replayed with its own ops' durations: what the means leave out is their spread
    replayed = [pipeline_sim.simulate(order, pipeline_trace.OpTimes.from_step(s), p2p=p2p) for s in steps]
    chunks = sorted({c for _, c in measured.alone})
    per_chunk = {k: [1e3 * measured.alone.get((k, c), math.nan) for c in chunks] for k in ("F", "B", "Bi", "W")}
    out.update(f_ms=1e3 * f, b_ms=1e3 * b, w_ms=1e3 * w, fb_ms=1e3 * fb, f_ms_per_rank=per["pp_f_ms"],
               ms_per_chunk={k: v for k, v in per_chunk.items() if not all(map(math.isnan, v))},
               step_s=statistics.mean(per["pp_step_s"]), bubble_s=bubble,
               bubble_mean_s=statistics.mean(bubble), formula_s=formula,
               simulated_s=statistics.mean(r.idle for r in sim.ranks), p2p_ms=1e3 * p2p, p2p_samples=len(lat),
               simulated_measured_s=[measured_sim.ranks[stage_of[r]].idle for r in sorted(stage_of)],
               simulated_per_op_s=[statistics.mean(s.ranks[stage_of[r]].idle for s in replayed)
                                   for r in sorted(stage_of)],
               wait_s=per["pp_wait_s"],
               ep_wait_s=per.get("ep_wait_s"), in_flight=per["pp_in_flight"], table2_activations=activations,
               peak_rss_mb=per["peak_rss_mb"])
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
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks per stage")
    p.add_argument("--ranks-per-node", type=int, default=0, help="pretend node size (default: --ep)")
    p.add_argument("--links", help="shaped links, e.g. ib=200mbit,nvlink=640mbit (needs root)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a further config override for every run, e.g. model.num_nextn_predict_layers=0")
    p.add_argument("--cut", action="append", default=[], metavar="SCHEDULE:N,N,..",
                   help="parallel.pp_layers for the runs of that schedule whose chunk count matches, e.g. "
                        "dualpipev:4,5,4,3 (default: the FLOP-balanced cut)")
    p.add_argument("--plot", help="draw each layout's last step, per rank, into this folder")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    print(f"{os.cpu_count()} cores; {args.layers} layers, hidden {args.hidden}, seq {args.seq}, "
          f"{args.global_batch // args.ep} micro-batches of 1 per step and rank, {args.steps} steps ({args.warm} left "
          f"out); EP {args.ep}, {args.ranks_per_node or args.ep} rank(s) per node, links {args.links or 'unshaped'}; "
          f"overrides {' '.join(args.set) or 'none'}; cuts {' '.join(args.cut) or 'FLOP-balanced'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_tokens(root / "tokens", args.vocab)
        for pp, kind, overlap, zb in [layout for layout in LAYOUTS if layout[0] <= args.max_pp]:
            records, trace = run(args, root, pp, kind, overlap, zb)
            rows.append(summarise(records, trace, pp, kind, overlap, zb, args.global_batch // args.ep, args.warm))
            if args.json:  # after every layout, so that a run stopped at a time limit keeps what it measured
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
            r = rows[-1]
            if pp == 1:
                print(f"no pipeline{'':33s} {r['tokens_per_s']:8.0f} tok/s")
                continue
            name = (f"{kind} {'overlapped' if overlap else 'in order'}{'' if zb else ', no W split'}"
                    if kind == "dualpipev" else kind)
            if args.plot:
                Path(args.plot).mkdir(parents=True, exist_ok=True)
                pipeline_trace.plot(pipeline_trace.read(trace, args.steps - 1)[0],
                                    Path(args.plot) / f"pipeline_pp{pp}_{name.replace(' ', '_')}.png",
                                    f"PP {pp} {name}: the last step, per rank")
            ep_wait = f"  all-to-all wait {_ranks(r['ep_wait_s'], 3)} s" if r["a2a_bytes"] else ""
            print(f"PP {pp} {name:36s} {r['tokens_per_s']:8.0f} tok/s  step {r['step_s']:.3f} s  F {r['f_ms']:.1f} "
                  f"ms  B {r['b_ms']:.1f} ms  W {r['w_ms']:.1f} ms  F&B {r['fb_ms']:.1f} ms  receive wait "
                  f"{_ranks(r['wait_s'], 3)} s{ep_wait}"
                  f"  bubble {r['bubble_mean_s']:.3f} s ({_ranks(r['bubble_s'], 3)})  formula {r['formula_s']:.3f} s"
                  f"  simulated {r['simulated_s']:.3f} s; with each chunk's measured times and the measured "
                  f"latency {r['p2p_ms']:.2f} ms ({r['p2p_samples']} messages): {_ranks(r['simulated_measured_s'], 3)}"
                  f" s  per chunk (ms): {'; '.join(f'{k} {_ranks(v, 1)}' for k, v in r['ms_per_chunk'].items())}"
                  f"  in flight {_ranks(r['in_flight'], 0)} (Table 2: {r['table2_activations']})  peak RSS "
                  f"{_ranks(r['peak_rss_mb'], 0)} MB")
    for pp in sorted({r["pp"] for r in rows} - {1}):
        at = [r for r in rows if r["pp"] == pp]
        one = next(r for r in at if r["schedule"] == "1f1b")
        in_order, overlapped, no_split = (next(r for r in at if r["schedule"] == "dualpipev" and r["overlap"] == o
                                               and r["zero_bubble"] == z) for o, z in ((False, True), (True, True),
                                                                                       (True, False)))
        bubble, simulated = ([r[k] / one[k] for r in (in_order, overlapped)] for k in ("bubble_mean_s", "simulated_s"))
        print(f"PP {pp}: DualPipeV's bubble / 1F1B's = {bubble[0]:.2f} in order, {bubble[1]:.2f} overlapped "
              f"(simulated {simulated[0]:.2f}, {simulated[1]:.2f}); overlapped / in order: step "
              f"{overlapped['step_s'] / in_order['step_s']:.2f}, F&B {overlapped['fb_ms'] / in_order['fb_ms']:.2f}; "
              f"W split / none (overlapped): bubble {overlapped['bubble_mean_s'] / no_split['bubble_mean_s']:.2f}, "
              f"step {overlapped['step_s'] / no_split['step_s']:.2f}")
        for r in at:
            name = r["schedule"] + (" overlapped" if r["overlap"] else "") + (
                " no W split" if r["schedule"] == "dualpipev" and not r["zero_bubble"] else "")
            print(f"  {name}: measured bubble / formula {r['bubble_mean_s'] / r['formula_s']:.2f}; measured / "
                  f"simulated, per rank: with each chunk's mean times "
                  f"{_ranks([m / s for m, s in zip(r['bubble_s'], r['simulated_measured_s'])], 2)}; with each "
                  f"op's own time {_ranks([m / s for m, s in zip(r['bubble_s'], r['simulated_per_op_s'])], 2)}")


def _ranks(values, digits: int) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in values)


if __name__ == "__main__":
    main()
