"""The measured separation of the tolerance verdict: honest replays vs dishonest variants of one segment.

A dishonest prover publishes a checkpoint K' that did not come from the stated inputs. Each variant
trains the segment K -> K' as the prover would have, with one thing changed:
  - shard:    one token shard changed (its tokens rolled by one position: every document in it differs);
  - document: one document changed (the one under the middle of the segment's first sample, its
              tokens reversed; same length, so every other window is untouched);
  - lr:       the learning rate × LR_FACTOR;
  - start:    the starting checkpoint's weights perturbed by Gaussian noise of START_NOISE × each
              tensor's RMS.
The honest replays are those on the verifier's layouts (A, the one judged, and B, the one that
calibrates the thresholds) and the stored checkpoint itself. For each, the distance of its weights to
honest replay A and of its per-step losses to A's, each as a ratio to its threshold (segment_check.py),
the larger one counting: every dishonest ratio must be above 1, every honest one below; the margins
are those ratios (dishonest) and their inverses (honest).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from sourcelm.provenance import distance as dist
from sourcelm.provenance.graph import Node, Report, read_state
from sourcelm.provenance.layouts import ReplayLayout, choose_layout
from sourcelm.provenance.replay import _token_dirs, run_replay
from sourcelm.provenance.segment_check import FAILED, calibration_layout, judge, judge_trajectory, segment_losses

LR_FACTOR = 1.1
START_NOISE = 0.01
VARIANTS = ("shard", "document", "lr", "start")


def _copy_tokens(dirs: list[str], dst: Path) -> list[Path]:
    out = []
    for i, d in enumerate(dirs):
        target = dst / f"tokens{i}"
        shutil.copytree(d, target)
        out.append(target)
    return out


def _shard_tokens(prefix: Path) -> np.ndarray:
    from sourcelm.tokens.indexed import ShardReader

    return np.memmap(str(prefix) + ".bin", dtype=ShardReader(prefix).dtype, mode="r+")


def change_shard(dirs: list[Path]) -> str:
    from sourcelm.tokens.indexed import find_shards

    prefix = Path(find_shards(dirs[0])[0])
    tokens = _shard_tokens(prefix)
    tokens[:] = np.roll(np.array(tokens), 1)
    tokens.flush()
    return f"shard {prefix.name}: tokens rolled by one position"


def change_document(dirs: list[Path], cfg: dict, first_sample: int) -> str:
    from sourcelm.tokens.loader import TokenWindows

    d = cfg["data"]
    windows = TokenWindows([str(p) for p in dirs], d["seq_len"], d["seed"], split="train",
                           valid_fraction=d["valid_fraction"], mixture=d.get("mixture"))
    stream = windows.sets[0].stream
    pos = windows.sets[0].window_index(first_sample) * d["seq_len"] + d["seq_len"] // 2
    seg = int(np.searchsorted(stream.seg_begin, pos, side="right")) - 1
    shard = stream.shards[int(stream.seg_shard[seg])]
    begin, length = int(stream.seg_start[seg]), int(stream.seg_len[seg])
    tokens = _shard_tokens(Path(shard.prefix))
    tokens[begin:begin + length] = np.array(tokens[begin:begin + length])[::-1]
    tokens.flush()
    return f"document at tokens {begin}..{begin + length} of {Path(shard.prefix).name} reversed"


def perturbed_start(start: Node, dst: Path) -> Path:
    from sourcelm.train import checkpoint as ckpt

    model, optim, state = ckpt.load_checkpoint(start.dir)
    gen = torch.Generator().manual_seed(0)
    for k, v in model.items():
        if v.is_floating_point() and v.numel() > 1:
            rms = float(v.double().pow(2).mean().sqrt())
            model[k] = v + (torch.randn(v.shape, generator=gen) * START_NOISE * rms).to(v.dtype)
    state.pop("files", None)
    return ckpt.save_checkpoint(dst, state["step"], model, optim, state, keep=0)


def forge(report: Report, start: Node, end: Node, kind: str, layout: ReplayLayout, work: Path) -> tuple[Path, str]:
    """Trains the segment as a dishonest prover would (module docstring); returns its checkpoint K' and what changed."""
    end_state = read_state(end)
    work.mkdir(parents=True, exist_ok=True)
    edit, start_dir, what = None, None, ""
    if kind in ("shard", "document"):
        dirs = _copy_tokens(_token_dirs(report, end, end_state["config"]["data"]["train"]), work)
        what = (change_shard(dirs) if kind == "shard" else
                change_document(dirs, end_state["config"], read_state(start)["consumed_samples"]))

        def edit(cfg):
            cfg["data"]["train"] = [str(p) for p in dirs]
    elif kind == "lr":
        what = f"optim.lr x {LR_FACTOR}"

        def edit(cfg):
            cfg["optim"]["lr"] *= LR_FACTOR
    elif kind == "start":
        start_dir = perturbed_start(start, work / "start")
        what = f"start weights + N(0, ({START_NOISE} x RMS)^2)"
    else:
        raise ValueError(f"unknown variant {kind!r}; one of {VARIANTS}")
    run = run_replay(report, start, end, end_state, layout, work / "run", show_progress=False, config_edit=edit,
                     start_dir=start_dir)
    if run.checkpoint is None:
        raise RuntimeError(f"variant {kind}: {run.error}")
    return run.checkpoint, what


def separation(report: Report, start: Node, end: Node, work: Path, nproc: int = 1,
               variants: tuple[str, ...] = VARIANTS, margin: float = dist.MARGIN) -> dict:
    """Honest replays on two layouts and the dishonest variants of one segment, each judged against the threshold
    those honest replays calibrate (module docstring)."""
    state = read_state(end)
    a_layout = choose_layout(state, nproc, None, None, virtual=False)  # the tolerance verdict is measured
    b_layout = calibration_layout(state, a_layout)
    a = run_replay(report, start, end, state, a_layout, work / "a", show_progress=False)
    b = run_replay(report, start, end, state, b_layout, work / "b", show_progress=False)
    if a.checkpoint is None or b.checkpoint is None:
        raise RuntimeError(f"an honest replay failed: {a.error or b.error}")
    start_t = dist.load_tensors(start.dir)
    a_t = dist.load_tensors(a.checkpoint)
    threshold = dist.calibrate(dist.distance(a_t, dist.load_tensors(b.checkpoint), start_t),
                               f"{a_layout.describe()} vs {b_layout.describe()}", margin)
    segment = f"steps {start.manifest['step']}→{end.manifest['step']}"
    a_losses, b_losses = segment_losses(a.checkpoint), segment_losses(b.checkpoint)
    rows = []

    def judged(name: str, honest: bool, tensors: dict, losses: list | None, what: str) -> None:
        """The verdict segment_check would give: the weights within their threshold and the losses within their
        band; the ratio is the larger of the two."""
        d = dist.distance(a_t, tensors, start_t)
        verdict, detail = judge(segment, d, threshold)
        r_weights = dist.ratio(d, threshold)
        trajectory = judge_trajectory(segment, start.manifest["step"], a_losses, b_losses, losses, margin)
        r = max(r_weights, trajectory["ratio"]) if trajectory else r_weights
        if trajectory and trajectory["ratio"] > 1 and verdict != FAILED:
            verdict, detail = FAILED, trajectory["detail"]
        rows.append({"case": name, "honest": honest, "what": what, "distance": d.to_dict(), "ratio": r,
                     "weights_ratio": r_weights, "trajectory_ratio": trajectory["ratio"] if trajectory else None,
                     "first_step_over": trajectory.get("first_step_over") if trajectory else None,
                     "margin": (1 / r if r else float("inf")) if honest else r, "verdict": verdict, "detail": detail,
                     "separated": (verdict != FAILED) == honest})

    judged("stored checkpoint", True, dist.load_tensors(end.dir), state.get("segment_losses"),
           f"as trained on {state.get('layout', '?')}")
    for kind in variants:
        ckpt, what = forge(report, start, end, kind, a_layout, work / kind)
        judged(kind, False, dist.load_tensors(ckpt), segment_losses(ckpt), what)
    return {"segment": segment, "threshold": threshold.to_dict(),
            "trajectory_threshold": dist.calibrate_trajectory(dist.loss_gaps(a_losses, b_losses), margin).to_dict(),
            "cases": rows,
            "honest_costs": {"a": {"layout": a_layout.describe(), "seconds": a.seconds, "peak_rss": a.peak_rss},
                             "b": {"layout": b_layout.describe(), "seconds": b.seconds, "peak_rss": b.peak_rss}},
            "all_separated": all(r["separated"] for r in rows)}


def write_separation(run_dir: Path, result: dict) -> Path:
    out = Path(run_dir) / "verification" / "separation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return out
