"""Runs a plan: stage by stage (pending tasks through the executor, then the stage's global
`resolve`), then writes the run's statistics, funnel plot and manifest.

Output folder:
    documents/<task>.jsonl.zst     curated documents {id, text, source, url, metadata}
    drops/stage<k>-<task>.jsonl.zst   one line per dropped document {id, source, url, reason="step:reason"}
    stats.json                     per step: documents and bytes in/out, drops by reason, time, counters
    funnel.png                     documents left after each step
    pipeline.json                  the resolved pipeline (what `audit` reads)
    manifest.json                  SHA-256 of every input and output, the pipeline, code version
    .done/, work/                  task markers, and the global steps' working files
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from sourcelm.artifacts import atomic_write_bytes, write_manifest
from sourcelm.data.pipeline.plan import Plan
from sourcelm.data.pipeline.progress import StageProgress
from sourcelm.data.pipeline.registry import build_step
from sourcelm.data.pipeline.report import merge_stats, write_funnel_plot
from sourcelm.data.pipeline.task import global_work_dir, marker_path, resolve_marker


def run_plan(plan: Plan, out: str | Path, executor, workers: int = 1, show_progress: bool = True) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_pipeline(plan, out)
    n_tasks = len(plan.tasks)
    task_results: list[dict] = []
    resolve_times: dict[str, float] = {}
    start = time.perf_counter()
    if hasattr(executor, "start"):
        executor.start()
    try:
        expected = None  # documents entering the current stage, when known
        for k, stage in enumerate(plan.stages):
            done = {}
            for t in range(n_tasks):
                m = marker_path(out, k, t)
                if m.is_file():
                    done[t] = json.loads(m.read_text())
            pending = [t for t in range(n_tasks) if t not in done]
            label = f"stage {k + 1}/{len(plan.stages)}"
            if show_progress:
                print(f"{label}: {_stage_steps(plan, k)}")
            total_bytes = sum(f.size for t in range(n_tasks) for f in plan.tasks[t])
            with StageProgress(label, expected, show_progress) as progress:
                if k == 0:
                    progress.estimate_from_bytes(total_bytes,
                                                 {t: sum(f.size for f in plan.tasks[t]) for t in range(n_tasks)})
                progress.resume(done.values())
                results = (executor.run_stage(plan, out, k, pending, progress.advance, progress.task_done)
                           if pending else [])
            stage_results = sorted([*done.values(), *results], key=lambda r: r["task"])
            task_results += stage_results
            expected = sum(r["docs_written"] for r in stage_results)
            if stage.closes_with is not None:
                resolve_times.update(_resolve(plan, out, stage.closes_with, n_tasks, workers))
    finally:
        if hasattr(executor, "close"):
            executor.close()
    stats = merge_stats(plan, task_results)
    for name, secs in resolve_times.items():
        stats["steps"].setdefault(name, {})["resolve_time_s"] = secs
    stats["wall_s"] = round(time.perf_counter() - start, 3)
    stats["executor"] = getattr(executor, "name", type(executor).__name__)
    atomic_write_bytes(out / "stats.json", (json.dumps(stats, indent=2) + "\n").encode())
    write_funnel_plot(stats, out / "funnel.png", title=plan.name)
    for k in range(len(plan.stages)):  # the documents between stages are no longer needed
        shutil.rmtree(out / "work" / f"stage{k}", ignore_errors=True)
    _write_manifest(plan, out)
    return stats


def _stage_steps(plan: Plan, k: int) -> str:
    stage = plan.stages[k]
    names = plan.step_names[stage.start:stage.end]
    if stage.closes_with is not None:
        names = [*names, f"{plan.step_names[stage.closes_with]}.collect"]
    if stage.opens_with is not None:
        names = [f"{plan.step_names[stage.opens_with]}.decide", *names]
    return ", ".join(names) or "write"


def _resolve(plan: Plan, out: Path, step_index: int, n_tasks: int, workers: int) -> dict[str, float]:
    marker = resolve_marker(out, step_index)
    name = plan.step_names[step_index]
    if marker.is_file():
        return {name: json.loads(marker.read_text())["time_s"]}
    step = build_step(plan.steps[step_index], step_index)
    print(f"{name}: resolving over {n_tasks} task(s)")
    t0 = time.perf_counter()
    step.resolve(global_work_dir(out, plan, step_index), n_tasks, workers)
    secs = time.perf_counter() - t0
    atomic_write_bytes(marker, json.dumps({"time_s": secs, "counters": dict(getattr(step, "counters", {}))}).encode())
    return {name: secs}


def _check_same_pipeline(plan: Plan, out: Path) -> None:
    """A rerun into a folder holding another pipeline's markers would mix two runs: refuse."""
    resolved = json.dumps(plan.resolved(), sort_keys=True)
    path = out / "pipeline.json"
    if path.is_file():
        previous = json.dumps(json.loads(path.read_text()), sort_keys=True)
        if previous != resolved and (out / ".done").exists():
            from sourcelm.config import ConfigError

            raise ConfigError(f"--output {out}: holds a run of a different pipeline or inputs; "
                              "use an empty folder (or delete this one) to start over")
    atomic_write_bytes(path, (json.dumps(plan.resolved(), indent=2, sort_keys=True) + "\n").encode())


def _write_manifest(plan: Plan, out: Path) -> None:
    outputs = sorted(p.relative_to(out) for d in ("documents", "drops") for p in (out / d).rglob("*")
                     if p.is_file() and not p.name.startswith("."))
    outputs += [Path("stats.json"), Path("funnel.png"), Path("pipeline.json")]
    inputs = [f.path for t in plan.tasks for f in t]
    # the corpus manifest, where the inputs come from a fetched corpus, links this run to it
    corpus_manifests = {str(p / "manifest.json") for f in inputs for p in Path(f).parents
                        if (p / "manifest.json").is_file()}
    write_manifest(out, "curate", outputs, inputs=[*sorted(corpus_manifests), *inputs],
                   config=plan.resolved())
