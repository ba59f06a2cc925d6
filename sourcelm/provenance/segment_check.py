"""One segment checked on the verifier's layout: exact, within tolerance, failed, or not run.

1. Inputs first: the start checkpoint (K > 0), the token shards the run read, the code version the
   checkpoint names. Anything missing makes the check "not run", naming what is missing.
2. The layout: validated and its memory estimated before anything runs (`layouts.py`); one that
   cannot hold the model is refused ("not run"), naming the memory it needs.
3. Replay A on the chosen layout. Bit-identical tensor files and counters: verdict "exact".
4. Otherwise a second honest replay B on another layout calibrates the thresholds: of the weights
   (`distance.calibrate`: MARGIN × distance(A, B)) and of the loss trajectory (`distance.calibrate_trajectory`:
   per step, MARGIN × the largest A-B loss gap so far). A's distance to the stored checkpoint within the first on
   both figures, and the stored checkpoint's losses within the second at every step, is "within tolerance"; else
   "failed", naming the segment and the tensors that moved most, or the first step whose loss left its band. The
   counters (steps, samples, loader position, RNG) must match exactly in every case. A checkpoint written before
   losses were stored with it is judged on its weights alone, and the record says so.

Exact across process counts: `--nproc N` dividing the recorded ranks hosts them as virtual ranks
(`layouts.py`), the same sums in the same order, so the verdict is exact. On a real layout of other
ranks, exact is lost (see `exactness_breakers`): each breaker is a change of summation order in fp32,
and the routing (top-k on biased scores) and the balancer's sign() turn a last-bit change into a
different decision a few steps later.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from sourcelm.artifacts import sha256_file
from sourcelm.config import ConfigError
from sourcelm.provenance import distance as dist
from sourcelm.provenance.graph import Node, Report, read_state
from sourcelm.provenance.layouts import ReplayLayout, check_fits, choose_layout, layout_config, recorded_layout
from sourcelm.provenance.replay import (
    COMPARED_STATE,
    TENSOR_FILES,
    _token_dirs,
    code_note,
    compare_checkpoints,
    run_replay,
)
from sourcelm.train.checkpoint import verify_checkpoint

EXACT, TOLERANCE, FAILED, NOT_RUN = "exact", "within tolerance", "failed", "not run"


def exactness_breakers(recorded: ReplayLayout, replay: ReplayLayout, cfg) -> list[str]:
    """The operations whose summation order differs between the recorded layout and the replay's."""
    out = []
    rec_dp = recorded.world // recorded.parallel.get("pp", 1)
    new_dp = replay.world // replay.parallel.get("pp", 1)
    rec_ep, new_ep = recorded.parallel.get("ep", 1), replay.parallel.get("ep", 1)
    if rec_ep != new_ep:
        out.append(f"expert weight gradients: at EP {rec_ep} an expert's gradient is one matmul over the rows all "
                   f"{rec_ep} ranks dispatched to it (rows ordered by source rank); at EP {new_ep} it is a sum of "
                   f"per-rank or per-micro-batch matmuls, another fp32 summation order")
    if rec_dp != new_dp and max(rec_dp, new_dp) > 2:
        out.append(f"dense gradient reduction: {rec_dp} data-parallel rank(s) summed by the collective (gloo's ring "
                   f"order, chunk by chunk) vs {new_dp} rank(s) folding the same per-rank micro-batch gradients in "
                   f"sequence; with 2 terms the order cannot matter (a + b = b + a), with 3 or more it does")
    if recorded.parallel.get("pp", 1) != replay.parallel.get("pp", 1):
        out.append("gradient norm: summed per pipeline stage, then over stages, vs one sum over all parameters")
    return out


def missing_inputs(report: Report, start: Node | None, end: Node, end_state: dict) -> list[str]:
    """What the replay needs and cannot find: the start checkpoint, a token shard, the code version."""
    missing = []
    if start is not None:
        problem = verify_checkpoint(start.dir)
        if problem:
            missing.append(f"start checkpoint {report.rel(start.dir)}: {problem}")
    for d in _token_dirs(report, end, end_state["config"]["data"]["train"]):
        manifest = Path(d) / "manifest.json"
        if not manifest.is_file():
            missing.append(f"data shard folder {d}: manifest.json missing")
            continue
        for name in json.loads(manifest.read_text()).get("outputs", {}):
            if not (Path(d) / name).is_file():
                missing.append(f"data shard {Path(d) / name}")
    if not end.manifest.get("code"):
        missing.append(f"code version: {report.rel(end.path)} records none")
    return missing


def input_hashes(report: Report, start: Node | None, end: Node, end_state: dict) -> dict:
    data = {str(Path(d) / "manifest.json"): _sha(Path(d) / "manifest.json")
            for d in _token_dirs(report, end, end_state["config"]["data"]["train"])}
    return {"start_checkpoint": _sha(start.path) if start else "initialisation (seed "
            f"{end_state['config'].get('seed')})", "end_checkpoint": _sha(end.path), "data": data,
            "code": end.manifest.get("code", {})}


def _sha(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


def counters_differ(stored: Path, replayed: Path) -> list[str]:
    a, b = (json.loads((p / "state.json").read_text()) for p in (stored, replayed))
    return [k for k in COMPARED_STATE if a.get(k) != b.get(k)]


def calibration_layout(state: dict, chosen: ReplayLayout) -> ReplayLayout:
    """The second honest layout, a real one (no virtual ranks): one process when the chosen one has several, else
    two."""
    if chosen.world > 1:
        return choose_layout(state, 1, 1, None, virtual=False)
    return choose_layout(state, 2, 2, None, virtual=False)


def check_segment(report: Report, start: Node | None, end: Node, nproc: int | None = None,
                  ranks_per_node: int | None = None, layout: str | None = None,
                  calibrate: ReplayLayout | None = None, margin: float = dist.MARGIN, budget: int | None = None,
                  workdir: str | Path | None = None, show_progress: bool = True) -> dict:
    """The verification record of one segment (module docstring)."""
    end_state = read_state(end)
    a = start.manifest.get("step") if start else 0
    rec = {"segment": f"steps {a}→{end.manifest.get('step')}", "start_step": a, "end_step": end.manifest.get("step"),
           "checkpoint": report.rel(end.dir), "verdict": NOT_RUN, "detail": ""}
    if end_state is None:
        return dict(rec, detail=f"{report.rel(end.dir / 'state.json')} missing or unreadable: nothing to replay")
    rec["inputs"] = input_hashes(report, start, end, end_state)
    missing = missing_inputs(report, start, end, end_state)
    if missing:
        return dict(rec, detail="cannot replay, missing: " + "; ".join(missing))
    try:
        chosen = choose_layout(end_state, nproc, ranks_per_node, layout)
        cfg = layout_config(end_state, chosen)
    except ConfigError as e:
        return dict(rec, detail=f"layout refused: {e}")
    rec["layout"] = chosen.to_dict()
    rec["recorded_layout"] = recorded_layout(end_state).to_dict()
    need, refusal = check_fits(cfg, chosen, budget)
    rec["memory_estimate"] = need
    if refusal:
        return dict(rec, detail=f"layout refused: {refusal}")
    with tempfile.TemporaryDirectory(prefix="sourcelm-verify-", dir=workdir) as tmp:
        return _replay_and_judge(report, start, end, end_state, rec, chosen, cfg, calibrate, margin, budget,
                                 Path(tmp), show_progress)


def _replay_and_judge(report, start, end, end_state, rec, chosen, cfg, calibrate, margin, budget, tmp: Path,
                      show_progress) -> dict:
    t0 = time.perf_counter()
    run_a = run_replay(report, start, end, end_state, chosen, tmp / "a", show_progress)
    rec["cost"] = {"seconds": round(run_a.seconds, 2), "peak_rss": run_a.peak_rss}
    note = code_note(end)
    if run_a.checkpoint is None:
        return dict(rec, detail=run_a.error + note)
    moved = counters_differ(end.dir, run_a.checkpoint)
    same_bits = all(sha256_file(run_a.checkpoint / f) == sha256_file(end.dir / f) for f in TENSOR_FILES)
    if same_bits and not moved:
        return dict(rec, verdict=EXACT, detail=f"{rec['segment']} re-run in {run_a.seconds:.0f} s on "
                    f"{chosen.describe()}: weights, optimizer and counters bit-identical" + note)
    if chosen == recorded_layout(end_state):  # the same arithmetic in the same order: only exact can pass
        check = compare_checkpoints(report, end, run_a.checkpoint, rec["segment"], run_a.seconds)
        return dict(rec, verdict=FAILED, detail=check.detail + " (replayed on the recorded layout, where the bits "
                    "must agree)" + note)
    stored = dist.load_tensors(end.dir)
    start_t = dist.load_tensors(start.dir) if start else dist.init_tensors(end_state["config"])
    d_stored = dist.distance(dist.load_tensors(run_a.checkpoint), stored, start_t)
    rec["distance"] = d_stored.to_dict()
    rec["exact_broken_by"] = exactness_breakers(recorded_layout(end_state), chosen, cfg)
    if moved:
        return dict(rec, verdict=FAILED, detail=f"{rec['segment']}: counters differ from the stored checkpoint: "
                    f"{', '.join(moved)}" + note)
    second = calibrate or calibration_layout(end_state, chosen)
    _, refusal = check_fits(layout_config(end_state, second), second, budget)
    if refusal:
        return dict(rec, detail=f"not exact; the calibration replay cannot run: {refusal}" + note)
    run_b = run_replay(report, start, end, end_state, second, tmp / "b", show_progress)
    rec["calibration_cost"] = {"seconds": round(run_b.seconds, 2), "peak_rss": run_b.peak_rss}
    if run_b.checkpoint is None:
        return dict(rec, detail=f"not exact; the calibration replay failed: {run_b.error}" + note)
    a_t = dist.load_tensors(run_a.checkpoint)
    honest = dist.distance(a_t, dist.load_tensors(run_b.checkpoint), start_t)
    threshold = dist.calibrate(honest, f"{chosen.describe()} vs {second.describe()}", margin)
    rec["threshold"] = threshold.to_dict()
    rec["ratio"] = dist.ratio(d_stored, threshold)
    rec["verify_seconds"] = round(time.perf_counter() - t0, 2)
    trajectory = judge_trajectory(rec["segment"], rec["start_step"], segment_losses(run_a.checkpoint),
                                  segment_losses(run_b.checkpoint), end_state.get("segment_losses"), margin)
    shutil.rmtree(tmp / "b", ignore_errors=True)
    verdict, detail = judge(rec["segment"], d_stored, threshold)
    rec["trajectory"] = trajectory
    if trajectory is not None:
        rec["ratio"] = max(rec["ratio"], trajectory["ratio"])
        if verdict == TOLERANCE and trajectory["ratio"] > 1:
            verdict, detail = FAILED, trajectory["detail"]
        elif verdict == TOLERANCE:
            detail += f"; {trajectory['detail']}"
    elif verdict == TOLERANCE:
        detail += "; the loss trajectory not checked: the stored checkpoint keeps no per-step losses"
    if verdict == TOLERANCE:
        detail = f"not bit-identical (broken by: {'; '.join(rec['exact_broken_by']) or 'unknown'}); " + detail
    return dict(rec, verdict=verdict, detail=detail + note)


def segment_losses(ckpt_dir: Path) -> list | None:
    return json.loads((ckpt_dir / "state.json").read_text()).get("segment_losses")


def judge_trajectory(segment: str, start_step: int, replayed: list | None, calibration: list | None,
                     stored: list | None, margin: float = dist.MARGIN) -> dict | None:
    """The stored losses against an honest replay's, step by step, within the band two honest replays calibrate
    (`distance.calibrate_trajectory`); None when the stored checkpoint has no losses (written before they were
    kept)."""
    if stored is None:
        return None
    if replayed is None or calibration is None:
        raise ValueError("a replay wrote no segment losses: replays run this code, which always writes them")
    threshold = dist.calibrate_trajectory(dist.loss_gaps(replayed, calibration), margin)
    gaps = dist.loss_gaps(replayed, stored)
    ratio, first = threshold.judge(gaps)
    out = {"gaps": gaps, "threshold": threshold.to_dict(), "ratio": ratio}
    if first is None:
        out["detail"] = f"the loss of every step within its band (worst {ratio:.3g} of it)"
    elif len(gaps) != len(threshold.per_step):
        out["detail"] = (f"{segment}: the stored checkpoint records {len(stored)} step losses, the replay "
                         f"{len(replayed)}")
    else:
        step = start_step + first + 1
        out["detail"] = (f"{segment}: from step {step} the stored losses leave the band of honest replays: step "
                         f"{step} stored {_loss(stored[first])}, replayed {_loss(replayed[first])} (relative gap "
                         f"{gaps[first]:.3g}, {gaps[first] / threshold.per_step[first]:.3g} x its threshold "
                         f"{threshold.per_step[first]:.3g})")
        out["first_step_over"] = step
    return out


def _loss(x) -> str:
    return "skipped" if x is None else f"{x:.6g}"


def judge(segment: str, d: dist.Distance, threshold: dist.Threshold) -> tuple[str, str]:
    """The tolerance verdict of a distance to the stored checkpoint; a failure names the segment and the tensors
    that moved most."""
    r = dist.ratio(d, threshold)
    if threshold.admits(d):
        return TOLERANCE, (f"distance to the stored checkpoint rel L2 {d.rel_l2:.3g}, max {d.max_abs:.3g} within the "
                           f"threshold {threshold.rel_l2:.3g} / {threshold.max_abs:.3g} ({r:.3g} of it)")
    return FAILED, (f"{segment}: the stored checkpoint is {r:.3g} x the calibrated threshold from an honest replay "
                    f"(rel L2 {d.rel_l2:.3g} vs {threshold.rel_l2:.3g}, max {d.max_abs:.3g} vs "
                    f"{threshold.max_abs:.3g}); moved most: {d.worst()}")
