"""The cost of verifying a training segment vs the cost of training it, per layout, and the separation margins.

    python bench/verify_cost.py RUN_TRAIN_DIR [--replay K] [--nproc 4 2 1] [--separation]

For segment K -> K' of a run (a `sourcelm train` run dir with checkpoints and metrics.jsonl), replays
it once per layout (`sourcelm verify`'s replay: a fresh process tree resuming from checkpoint K) and
prints the replay's wall time, peak RSS (largest process) and whether its checkpoint is bit-identical
to the stored one, next to the original segment's training time (the sum of its steps' step_time in
metrics.jsonl: the steps alone, no start-up). Each N below the recorded process count runs twice: the
recorded ranks hosted as virtual ranks on N processes, and the real layout of N ranks. With
--separation, also the honest-vs-dishonest measurement (`sourcelm.provenance.forgery`) on one process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sourcelm.artifacts import sha256_file
from sourcelm.provenance.forgery import separation, write_separation
from sourcelm.provenance.graph import read_state, walk
from sourcelm.provenance.layouts import choose_layout
from sourcelm.provenance.replay import TENSOR_FILES, find_segment, run_replay


def training_seconds(run_dir: Path, a: int, b: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(r["step_time"] for r in rows if "step_time" in r and a < r.get("step", -1) <= b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--replay", type=int, default=None, help="segment start (default: the last segment)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[4, 2, 1])
    ap.add_argument("--separation", action="store_true")
    args = ap.parse_args()
    report = walk(args.run_dir)
    nodes = next(iter(report.checkpoint_runs().values()))
    k = args.replay if args.replay is not None else (nodes[-2].manifest["step"] if len(nodes) > 1 else 0)
    start, end = find_segment(report, k)
    state = read_state(end)
    a, b = k, state["step"]
    trained = training_seconds(args.run_dir, a, b)
    print(f"segment {a}->{b} of {args.run_dir}: trained in {trained:.1f} s of step time on {state.get('layout')}")
    print(f"{'layout':<100} {'replay s':>9} {'/ train':>8} {'peak RSS MiB':>13}  bit-identical")
    with tempfile.TemporaryDirectory(prefix="verify-cost-") as tmp:
        layouts = {}
        for n in args.nproc:
            for virtual in (True, False):
                layout = choose_layout(state, n, None, None, virtual=virtual)
                layouts.setdefault(layout.describe(), layout)
        for i, (name, layout) in enumerate(layouts.items()):
            run = run_replay(report, start, end, state, layout, Path(tmp) / f"l{i}", show_progress=False)
            if run.checkpoint is None:
                print(f"{name:<100} failed: {run.error}")
                continue
            same = all(sha256_file(run.checkpoint / f) == state["files"][f] for f in TENSOR_FILES)
            print(f"{name:<100} {run.seconds:>9.1f} {run.seconds / trained:>8.2f} {run.peak_rss / 2**20:>13.0f}  "
                  f"{'yes' if same else 'no'}", flush=True)
        if args.separation:
            result = separation(report, start, end, Path(tmp) / "sep", nproc=1)
            t = result["threshold"]
            print(f"\nthreshold: {t['derivation']}")
            print(f"loss trajectory: {result['trajectory_threshold']['derivation']}")
            print(f"{'case':<20} {'honest':>6} {'rel L2':>10} {'max':>10} {'x weights':>10} {'x losses':>10} "
                  f"{'first step out':>15} {'margin':>8}  verdict")
            for r in result["cases"]:
                d = r["distance"]
                print(f"{r['case']:<20} {str(r['honest']):>6} {d['rel_l2']:>10.3g} {d['max_abs']:>10.3g} "
                      f"{r['weights_ratio']:>10.3g} {r['trajectory_ratio'] or 0:>10.3g} "
                      f"{str(r['first_step_over'] or '-'):>15} {r['margin']:>8.3g}  {r['verdict']}: {r['what']}")
            print(f"all separated: {result['all_separated']} ({write_separation(args.run_dir, result)})")


if __name__ == "__main__":
    main()
