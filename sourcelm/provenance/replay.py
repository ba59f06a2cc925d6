"""Segment replay: re-run training from one stored checkpoint to the next and compare the bits.

A segment is (K, K'), two consecutive checkpoints of one run (K = 0: from the initialisation,
which is a pure function of the seed). The replay takes the config recorded in checkpoint K'
(the config that produced it), the launch layout recorded in its state.json (`launch`: processes
and ranks per node, so the same reduction order), resumes from checkpoint K in a fresh run
directory and trains K' − K steps. The result must be bit-identical to the stored checkpoint K':
the same SHA-256 for model.safetensors and optimizer.safetensors, and the same step, sample,
token, loader and RNG counters.

The replay runs the code of the current checkout; when that is not the code version the checkpoint
records, the verdict says so (other code may legitimately compute other bits).

What changes for the replay, none of which enters the weights: the token shard paths (taken from
the checkpoint's manifest links, so a moved run still replays), validation and TensorBoard (off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sourcelm.artifacts import code_version, sha256_file
from sourcelm.provenance.graph import Check, Node, Report, code_id, describe_code, read_state

COMPARED_STATE = ("step", "consumed_samples", "consumed_tokens", "optimizer_step", "loader", "rng",
                  "bad_in_row", "skipped_steps")
TENSOR_FILES = ("model.safetensors", "optimizer.safetensors")


def segments(report: Report) -> list[tuple[Node | None, Node]]:
    """Every (start, end) pair of consecutive checkpoints of the run, the first from init."""
    runs = report.checkpoint_runs()
    if len(runs) != 1:
        return []
    nodes = next(iter(runs.values()))
    return list(zip([None, *nodes[:-1]], nodes))


def find_segment(report: Report, k: int) -> tuple[Node | None, Node]:
    segs = segments(report)
    if not segs:
        raise ValueError("no single training run with checkpoints found to replay")
    for start, end in segs:
        if (start.manifest.get("step") if start else 0) == k:
            return start, end
    steps = [0] + [e.manifest.get("step") for _, e in segs[:-1]]
    raise ValueError(f"--replay {k}: no segment starts at step {k}; segments start at {steps} "
                     "(0 = from the initialisation; the last checkpoint starts none)")


def _token_dirs(report: Report, end: Node, listed: list[str]) -> list[str]:
    """The shard dirs of `data.train`, found through the checkpoint's manifest links (absolute), so a moved or
    copied run replays from its own shards: each listed dir is the linked one that ends in the same folder names
    (the links include the validation shards too)."""
    linked = [(end.dir / i["path"]).resolve() for i in end.manifest.get("inputs", [])]
    linked = [p.parent for p in linked if p in report.nodes and report.nodes[p].kind == "tokenize"]
    out = []
    for path in listed:
        tail = Path(path).parts[-2:]
        match = [p for p in linked if p.parts[-len(tail):] == tail]
        out.append(str(match[0] if len(match) == 1 else Path(path).resolve()))
    return out


def replay_config(report: Report, end_state: dict, end: Node, show_progress: bool) -> dict:
    cfg = json.loads(json.dumps(end_state["config"]))
    cfg["data"]["train"] = _token_dirs(report, end, cfg["data"]["train"])
    cfg["data"]["valid"] = []
    cfg["logging"].update(valid_every=0, tensorboard=False, progress=show_progress)
    return cfg


def launch_command(config_path: Path, run_dir: Path, start: Path | None, steps: int, launch: dict) -> list[str]:
    rank_args = [str(config_path), "--run-dir", str(run_dir), "--stop-after", str(steps),
                 "--ranks-per-node", str(launch.get("ranks_per_node", 1))]
    rank_args += ["--resume-from", str(start)] if start else ["--no-resume"]
    if launch.get("virtual", 1) > 1:
        rank_args += ["--virtual-ranks", str(launch["virtual"])]
    nproc = int(launch.get("nproc", 1))
    # run under this module's peak-memory wrapper (`__main__` below)
    wrap = [sys.executable, "-m", "sourcelm.provenance.replay", str(run_dir.parent / "peak_rss.json"), "--"]
    if nproc == 1:
        return [*wrap, sys.executable, "-m", "sourcelm.train", *rank_args]
    return [*wrap, sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "--module", "sourcelm.train", *rank_args]


@dataclass
class ReplayRun:
    """One replay of a segment: where its checkpoint is, what it cost."""
    checkpoint: Path | None  # the replayed checkpoint K' (None when the run failed)
    seconds: float
    peak_rss: int  # bytes, the largest process of the replay
    error: str = ""


def run_replay(report: Report, start: Node | None, end: Node, end_state: dict, layout, workdir: Path,
               show_progress: bool = True, config_edit=None, start_dir: Path | None = None) -> ReplayRun:
    """Trains checkpoint K -> K' again in `workdir` on `layout` (a `layouts.ReplayLayout`) and keeps the result.
    config_edit (a function of the config dict) and start_dir (another checkpoint K) make the dishonest variants
    the separation measurement needs (`forgery.py`)."""
    a, b = (start.manifest.get("step") if start else 0), end_state["step"]
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = replay_config(report, end_state, end, show_progress)
    cfg["parallel"].update(layout.parallel, ranks_per_node=layout.ranks_per_node)
    if config_edit:
        config_edit(cfg)
    start_dir = start_dir or (start.dir if start else None)
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(cfg, indent=2))
    launch = {"nproc": layout.nproc, "ranks_per_node": layout.ranks_per_node, "virtual": layout.virtual}
    cmd = launch_command(config_path, workdir / "run", start_dir, b - a, launch)
    env = dict(os.environ)
    if layout.threads:  # the recorded thread count: the weight-gradient bits depend on it
        env["OMP_NUM_THREADS"] = str(layout.threads)
    elif layout.world > 1:
        env.setdefault("OMP_NUM_THREADS", "1")  # as `sourcelm train --nproc` runs its ranks
    if show_progress:
        print(f"replay steps {a}→{b} of {report.rel(end.dir.parent.parent)} on {layout.describe()}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, env=env, stdout=None if show_progress else subprocess.PIPE,
                          stderr=subprocess.STDOUT if not show_progress else None, text=True)
    secs = time.perf_counter() - t0
    peak_file = workdir / "peak_rss.json"
    peak = json.loads(peak_file.read_text())["peak_rss"] if peak_file.is_file() else 0
    replayed = workdir / "run" / "checkpoints" / end.dir.name
    if proc.returncode != 0 or not (replayed / "state.json").is_file():
        tail = (proc.stdout or "")[-800:] if not show_progress else ""
        return ReplayRun(None, secs, peak, f"the replay run failed (exit {proc.returncode}) {tail}")
    return ReplayRun(replayed, secs, peak)


def replay_segment(report: Report, start: Node | None, end: Node, show_progress: bool = True,
                   workdir: str | Path | None = None) -> Check:
    """Replays one segment on the recorded layout in a temporary run dir and returns the verdict as a Check row."""
    from sourcelm.provenance.layouts import recorded_layout

    end_state = read_state(end)
    if end_state is None:
        return Check(end.stage, report.rel(end.dir), "replay", False,
                     "state.json missing or unreadable: nothing to replay")
    a, b = (start.manifest.get("step") if start else 0), end_state["step"]
    label = f"steps {a}→{b}"
    with tempfile.TemporaryDirectory(prefix="sourcelm-replay-", dir=workdir) as tmp:
        run = run_replay(report, start, end, end_state, recorded_layout(end_state), Path(tmp), show_progress)
        if run.checkpoint is None:
            return Check(end.stage, report.rel(end.dir), "replay", False, f"{label}: {run.error}")
        check = compare_checkpoints(report, end, run.checkpoint, label, run.seconds)
        note = code_note(end)
        if note:
            check.detail += note
        return check


def code_note(end: Node) -> str:
    """Empty when this checkout is the code that made the checkpoint, else a note saying which is which."""
    made_by, running = end.manifest.get("code", {}), code_version()
    if code_id(made_by) == code_id(running):
        return ""
    # other code may compute other bits: say so, so a mismatch is not read as a forgery
    return (f" [replayed with code {describe_code(running)}; the checkpoint was made by {describe_code(made_by)}: "
            f"check that version out to replay it exactly]")


def compare_checkpoints(report: Report, end: Node, replayed: Path, label: str, secs: float) -> Check:
    stored_state = json.loads((end.dir / "state.json").read_text())
    new_state = json.loads((replayed / "state.json").read_text())
    problems = []
    for name in TENSOR_FILES:
        if sha256_file(replayed / name) != stored_state["files"][name]:
            problems.append(f"{name} differs ({_tensor_diff(end.dir / name, replayed / name)})")
    for key in COMPARED_STATE:
        if stored_state.get(key) != new_state.get(key):
            problems.append(f"state.{key} differs")
    if problems:
        return Check(end.stage, report.rel(end.dir), "replay", False, f"{label}: " + "; ".join(problems))
    return Check(end.stage, report.rel(end.dir), "replay", True,
                 f"{label} re-run in {secs:.0f} s: weights, optimizer and counters bit-identical")


def _tensor_diff(a: Path, b: Path) -> str:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    names = sorted(set(ta) | set(tb))
    differ = [n for n in names if n not in ta or n not in tb or not ta[n].equal(tb[n])]
    if not differ:
        return "same tensors, different file bytes"
    worst = max(((float((ta[n].double() - tb[n].double()).abs().max()), n) for n in differ
                 if n in ta and n in tb and ta[n].shape == tb[n].shape), default=(float("nan"), "none comparable"))
    return f"{len(differ)} of {len(names)} tensors, largest |Δ| {worst[0]:.3g} in {worst[1]}"


def _run_measuring_peak(out: str, cmd: list[str]) -> int:
    """Runs cmd and writes the peak RSS of its largest process (descendants included: the kernel folds a reaped
    child's peak into its parent's RUSAGE_CHILDREN) to `out`."""
    import resource

    code = subprocess.call(cmd)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    Path(out).write_text(json.dumps({"peak_rss": peak_kib * 1024}))
    return code


if __name__ == "__main__":  # python -m sourcelm.provenance.replay PEAK_JSON -- CMD...
    sys.exit(_run_measuring_peak(sys.argv[1], sys.argv[3:]))
