"""Statistics of a run: per-task numbers summed per step, and the funnel plot."""

from __future__ import annotations

import collections
from pathlib import Path

from sourcelm.data.pipeline.plan import Plan

_SUMMED = ("docs_in", "docs_out", "bytes_in", "bytes_out", "time_s")


def merge_stats(plan: Plan, task_results: list[dict]) -> dict:
    """Sums the task statistics per step, in pipeline order ("read" first)."""
    order = ["read"]
    for _i, name in enumerate(plan.step_names):
        order.append(name)
    merged: dict[str, dict] = {}
    extras: dict[str, dict] = {}
    for r in task_results:
        for name, st in r["steps"].items():
            target = merged if "drops" in st else extras
            m = target.setdefault(name, {k: 0 for k in _SUMMED} | {"drops": collections.Counter(),
                                                                   "counters": collections.Counter()})
            for k in _SUMMED:
                m[k] += st.get(k, 0)
            m["drops"].update(st.get("drops", {}))
            m["counters"].update({k: v for k, v in st.get("counters", {}).items() if isinstance(v, (int, float))})
    steps = {}
    for name in order + sorted(set(merged) - set(order)):
        if name in merged:
            m = merged[name]
            steps[name] = {**{k: m[k] for k in _SUMMED}, "time_s": round(m["time_s"], 4),
                           "docs_dropped": sum(m["drops"].values()),
                           "drops": dict(sorted(m["drops"].items())), "counters": dict(sorted(m["counters"].items()))}
            if m["time_s"] > 0:
                steps[name]["docs_per_s"] = round(m["docs_in"] / m["time_s"], 1)
    for name, m in extras.items():  # global steps' collect phase
        base = name.rsplit(".", 1)[0]
        steps.setdefault(base, {})[name.rsplit(".", 1)[1] + "_time_s"] = round(m["time_s"], 4)
        if m["counters"]:
            steps[base].setdefault("counters", {}).update(m["counters"])
    read = steps.get("read", {})
    last = next((steps[n] for n in reversed(order) if n in steps and "docs_out" in steps[n]), read)
    return {
        "pipeline": plan.name,
        "tasks": len(plan.tasks),
        "documents_read": read.get("docs_out", 0),
        "records_rejected": read.get("docs_dropped", 0),
        "documents_kept": last.get("docs_out", 0),
        "steps": steps,
    }


def funnel(stats: dict) -> list[tuple[str, int]]:
    """(step, documents left after it), starting with the documents read."""
    rows = []
    for name, st in stats["steps"].items():
        if "docs_out" in st:
            rows.append((name, st["docs_out"]))
    return rows


def write_funnel_plot(stats: dict, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = funnel(stats)
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.5))
    names = [r[0] for r in rows][::-1]
    values = [r[1] for r in rows][::-1]
    ax.barh(names, values, color="#4c72b0")
    top = max(values, default=0) or 1
    for y, v in enumerate(values):
        ax.text(v + top * 0.01, y, f"{v:,} ({100 * v / top:.1f}%)", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("documents left after the step")
    ax.set_title(f"curation funnel: {title}" if title else "curation funnel")
    fig.tight_layout()
    # fixed metadata, so the same numbers give the same PNG bytes
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
