"""How far a replayed checkpoint is from the stored one, tensor by tensor, and the calibrated threshold.

Per tensor (the weights of model.safetensors and the AdamW moments of optimizer.safetensors), two
figures:
  - relative L2: ‖replayed − stored‖₂ / ‖stored − start‖₂, the distance as a fraction of what the
    segment changed in that tensor (start = the same tensor in checkpoint K, or the initialisation).
    Relative to the update rather than to the weights: a segment moves weights by ~lr × steps, so
    a distance relative to the weights would look small for any forgery;
  - max: max |replayed − stored|, absolute.
A checkpoint's distance is the worst tensor of each figure.

The threshold is calibrated from the run itself: two honest replays of the same segment on two
different layouts differ only by summation order; their distance (each figure) times `MARGIN` is
the threshold. A replay within it on both figures is "within tolerance".

The loss trajectory, step by step: every checkpoint stores the loss of each step of the segment that led to it
(`segment_losses`), and so does a replay's. Honest replays on other layouts start equal to the last bits and drift
apart only as routing decisions and the balancer's sign() amplify those bits, step after step; a checkpoint trained
on other data, with another learning rate or from other weights differs from the first step the change touches.
So the loss gap |a − b| / |b| is judged per step against MARGIN × the largest gap of the two honest replays up to
that step (at least fp32's relative spacing, LOSS_FLOOR: a last-bit difference of the logged loss), which is tight
early in the segment, where the weights' distance, taken at its end, has long been blurred by the drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

MARGIN = 10.0  # how many times the honest cross-layout distance a replay may be from the stored checkpoint
LOSS_FLOOR = 2.0 ** -23  # fp32's relative spacing: the smallest honest loss gap the trajectory check assumes
TOP = 3  # tensors named in a verdict


@dataclass
class Distance:
    rel_l2: float  # worst tensor's ‖a − b‖ / ‖b − start‖
    max_abs: float  # worst tensor's max |a − b|
    tensors: list[dict]  # per differing tensor: name, rel_l2, max_abs; worst first

    def to_dict(self, top: int = TOP) -> dict:
        return {"rel_l2": self.rel_l2, "max_abs": self.max_abs, "differing_tensors": len(self.tensors),
                "worst_tensors": self.tensors[:top]}

    def worst(self, top: int = TOP) -> str:
        return ", ".join(f"{t['name']} (rel L2 {t['rel_l2']:.3g}, max {t['max_abs']:.3g})" for t in self.tensors[:top])


def load_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {f"model:{k}": v for k, v in load_file(str(ckpt_dir / "model.safetensors")).items()}
    out.update({f"optimizer:{k}": v for k, v in load_file(str(ckpt_dir / "optimizer.safetensors")).items()})
    return out


def init_tensors(config: dict) -> dict[str, torch.Tensor]:
    """Checkpoint 0: the initialisation (a pure function of the seed) and zero moments."""
    from sourcelm.config import load_config
    from sourcelm.model import build_model

    cfg = load_config(config)
    return {f"model:{k}": v.detach().clone() for k, v in build_model(cfg.model, seed=cfg.seed).state_dict().items()}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> Distance:
    """a vs b (b is the reference), relative to b − start. A tensor missing on one side or of another shape counts
    as infinitely far."""
    rows = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name].shape != b[name].shape:
            rows.append({"name": name, "rel_l2": math.inf, "max_abs": math.inf})
            continue
        x, y = a[name].double(), b[name].double()
        diff = x - y
        if not torch.any(diff != 0):
            continue
        s = start.get(name)
        moved = y - s.double() if s is not None and s.shape == y.shape else y  # moments start at zero
        norm = float(torch.linalg.vector_norm(moved))
        d = float(torch.linalg.vector_norm(diff))
        rows.append({"name": name, "rel_l2": d / norm if norm > 0 else math.inf,
                     "max_abs": float(diff.abs().max())})
    rows.sort(key=lambda r: (r["rel_l2"], r["max_abs"]), reverse=True)
    return Distance(max((r["rel_l2"] for r in rows), default=0.0), max((r["max_abs"] for r in rows), default=0.0),
                    rows)


@dataclass
class Threshold:
    rel_l2: float
    max_abs: float
    margin: float
    calibration: dict  # the two honest layouts and their distance

    def admits(self, d: Distance) -> bool:
        return d.rel_l2 <= self.rel_l2 and d.max_abs <= self.max_abs

    def to_dict(self) -> dict:
        return {"rel_l2": self.rel_l2, "max_abs": self.max_abs, "margin": self.margin, **self.calibration,
                "derivation": f"threshold = {self.margin:g} x the distance between two honest replays on different "
                              f"layouts ({self.calibration.get('layouts', '?')}): rel L2 "
                              f"{self.calibration['honest']['rel_l2']:.3g} -> {self.rel_l2:.3g}, max "
                              f"{self.calibration['honest']['max_abs']:.3g} -> {self.max_abs:.3g}"}


def calibrate(honest: Distance, layouts: str, margin: float = MARGIN) -> Threshold:
    return Threshold(margin * honest.rel_l2, margin * honest.max_abs, margin,
                     {"layouts": layouts, "honest": honest.to_dict()})


def ratio(d: Distance, t: Threshold) -> float:
    """How many thresholds away a distance is (the larger of the two figures); > 1 fails. The separation margin
    of an honest replay is 1 / ratio, of a dishonest one the ratio itself."""
    parts = [d.rel_l2 / t.rel_l2 if t.rel_l2 > 0 else (math.inf if d.rel_l2 > 0 else 0.0),
             d.max_abs / t.max_abs if t.max_abs > 0 else (math.inf if d.max_abs > 0 else 0.0)]
    return max(parts)


# ------------------------------------------------------------------------------------------------ trajectory

def loss_gaps(a: list, b: list) -> list[float]:
    """Per step, |a − b| / |b| (b the reference); a step missing or skipped (None) on one side only is infinitely far,
    skipped on both is no gap."""
    out = []
    for i in range(max(len(a), len(b))):
        x, y = (a[i] if i < len(a) else math.nan), (b[i] if i < len(b) else math.nan)
        if x is None and y is None:
            out.append(0.0)
        elif x is None or y is None or math.isnan(x) or math.isnan(y):
            out.append(math.inf)
        else:
            out.append(abs(x - y) / abs(y) if y else (0.0 if x == y else math.inf))
    return out


@dataclass
class TrajectoryThreshold:
    per_step: list[float]  # the largest gap step t may have: MARGIN × max(honest gaps up to t, LOSS_FLOOR)
    margin: float
    honest: list[float]  # the two honest replays' gaps

    def judge(self, gaps: list[float]) -> tuple[float, int | None]:
        """How many thresholds away the worst step is (> 1 fails), and the first step (0-based) over its threshold."""
        if len(gaps) != len(self.per_step):
            return math.inf, 0
        ratios = [g / t for g, t in zip(gaps, self.per_step)]
        first = next((i for i, r in enumerate(ratios) if r > 1), None)
        return max(ratios, default=0.0), first

    def to_dict(self) -> dict:
        return {"per_step": self.per_step, "honest_gaps": self.honest, "margin": self.margin,
                "derivation": f"per step t: {self.margin:g} x max(the honest replays' relative loss gap up to t, "
                              f"{LOSS_FLOOR:.3g})"}


def calibrate_trajectory(honest: list[float], margin: float = MARGIN) -> TrajectoryThreshold:
    per_step, worst = [], LOSS_FLOOR
    for g in honest:
        worst = max(worst, g)
        per_step.append(margin * worst)
    return TrajectoryThreshold(per_step, margin, honest)
