"""The pipeline executor's trace (SOURCELM_PIPELINE_TRACE, `sourcelm/train/pipeline.py`) read back: per-message
latency, per-chunk op times for the simulator, and a timeline plot.

Every rank wrote one line per step: its ops (start, end, whether half of an F&B pair), its sends (time) and its
receives (start, end), on the machine's shared monotonic clock, so events of different ranks compare directly.

Latency: a message's delivery time is measured where the receiver was already waiting when the sender posted it
(receive start <= send time): receive end - send time. Elsewhere the message had landed before anyone asked, and
its latency is hidden. The median of those is the p2p delay the simulator adds to every cross-rank dependency.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path


def read(trace_dir: Path, warm: int) -> list[dict[int, dict]]:
    """Per timed step (the first `warm` left out), rank -> that rank's record."""
    per_rank = {}
    for path in sorted(trace_dir.glob("rank*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        per_rank[lines[0]["rank"]] = lines[warm:]
    n_steps = min(len(v) for v in per_rank.values())
    return [{r: per_rank[r][i] for r in per_rank} for i in range(n_steps)]


def latencies(steps: list[dict[int, dict]]) -> list[float]:
    """Seconds from send to delivery of every message whose receiver was already waiting (module docstring)."""
    out = []
    for step in steps:
        sent = {(rank, e["peer"], e["send"]): e["t"] for rank, rec in step.items() for e in rec["events"]
                if "send" in e}
        for rank, rec in step.items():
            for e in rec["events"]:
                if "recv" in e:
                    t = sent.get((e["peer"], rank, e["recv"]))
                    if t is not None and e["start"] <= t:
                        out.append(e["end"] - t)
    return out


@dataclass
class MeasuredTimes:
    """Per (op kind, chunk), the mean compute seconds of that op run alone, not overlapped with another (receive waits
    left out; kinds F, B, Bi and W), and the mean wall time of an F&B pair: the simulator's `times`
    (plan/pipeline_sim.py), fed with what the ranks measured."""

    alone: dict[tuple[str, int], float]
    fb: float

    @classmethod
    def from_steps(cls, steps: list[dict[int, dict]]) -> MeasuredTimes:
        alone: dict[tuple[str, int], list[float]] = {}
        pairs = []
        for step in steps:
            for rec in step.values():
                ops = [e for e in rec["events"] if "op" in e]
                waits = [(e["start"], e["end"]) for e in rec["events"] if "recv" in e]
                paired = [e for e in ops if e["paired"]]
                in_order = []  # the halves of pairs run one after the other (parallel.pp_overlap=false) run alone
                for a, b in zip(paired[::2], paired[1::2]):
                    pairs.append(max(a["end"], b["end"]) - min(a["start"], b["start"]))
                    if a["end"] <= b["start"] or b["end"] <= a["start"]:
                        in_order += [a, b]
                for e in [e for e in ops if not e["paired"]] + in_order:
                    waited = sum(b - a for a, b in waits if e["start"] <= a and b <= e["end"])  # compute: wall - waits
                    alone.setdefault((e["op"], e["chunk"]), []).append(e["end"] - e["start"] - waited)
        means = {k: statistics.mean(v) for k, v in alone.items()}
        return cls(means, statistics.mean(pairs) if pairs else math.nan)

    def mean(self, kind: str) -> float:
        """Over chunks, the mean of an op kind run alone; nan where it never ran alone."""
        values = [t for (k, _), t in self.alone.items() if k == kind]
        return statistics.mean(values) if values else math.nan

    def full_backward(self) -> float:
        """The report's B (inputs and weights): the full B's where some ran alone, else a Bi and its W."""
        b = self.mean("B")
        return b if not math.isnan(b) else self.mean("Bi") + self.mean("W")

    def duration(self, step) -> float:
        if len(step.tasks) == 2:
            return self.fb
        task = step.tasks[0]
        return self.alone[(task.kind, task.chunk)]


@dataclass
class OpTimes:
    """One step's ops, each with the compute seconds it took (a pair: its wall time): the simulator replays the
    step's own durations, so what it leaves out is only what happened between the ops (messaging, scheduling)."""

    seconds: dict[tuple[str, int, int], float]  # (kind, chunk, micro-batch) -> seconds; pairs under both halves

    @classmethod
    def from_step(cls, step: dict[int, dict]) -> OpTimes:
        seconds = {}
        for rec in step.values():
            waits = [(e["start"], e["end"]) for e in rec["events"] if "recv" in e]
            ops = [e for e in rec["events"] if "op" in e]
            for e in ops:
                if not e["paired"]:
                    waited = sum(b - a for a, b in waits if e["start"] <= a and b <= e["end"])
                    seconds[(e["op"], e["chunk"], e["mb"])] = e["end"] - e["start"] - waited
            paired = [e for e in ops if e["paired"]]
            for a, b in zip(paired[::2], paired[1::2]):
                wall = max(a["end"], b["end"]) - min(a["start"], b["start"])
                seconds[(a["op"], a["chunk"], a["mb"])] = seconds[(b["op"], b["chunk"], b["mb"])] = wall
        return cls(seconds)

    def duration(self, step) -> float:
        task = step.tasks[0]
        return self.seconds[(task.kind, task.chunk, task.mb)]


def plot(step: dict[int, dict], path: Path, title: str) -> None:
    """One step's timeline: a row per rank, F, B, Bi and W bars per chunk (a pair's two halves in the upper and
    lower half of the row), receive waits as thin grey bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted(step)
    t0 = min(step[r]["start"] for r in ranks)
    fig, ax = plt.subplots(figsize=(12, 0.8 + 0.6 * len(ranks)))
    colors = {"F": "tab:blue", "B": "tab:orange", "Bi": "tab:red", "W": "tab:green"}
    for row, r in enumerate(ranks):
        for e in step[r]["events"]:
            if "op" in e:
                y, h = (row - 0.4, 0.8) if not e["paired"] else ((row, 0.4) if e["op"] == "F" else (row - 0.4, 0.4))
                ax.broken_barh([(1e3 * (e["start"] - t0), 1e3 * (e["end"] - e["start"]))], (y, h),
                               facecolors=colors[e["op"]], edgecolors="white", linewidth=0.3)
                ax.text(1e3 * (e["start"] + e["end"] - 2 * t0) / 2, y + h / 2, f"{e['chunk']}.{e['mb']}",
                        ha="center", va="center", fontsize=5)
            elif "recv" in e:
                ax.broken_barh([(1e3 * (e["start"] - t0), 1e3 * (e["end"] - e["start"]))], (row + 0.42, 0.06),
                               facecolors="grey")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms from the step's start (F blue, B orange, Bi red, W green, label chunk.micro-batch; grey: receive "
                  "waiting)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
