"""One task of one stage: the unit both executors schedule.

Stage 0 reads the task's input files; a later stage reads the documents its task kept in the
previous stage (`work/stage<k-1>/<task>.jsonl.zst`) and first asks the previous global step's
`decide`. Then the stage's per-document steps run in order; what survives goes to the next
global step's `collect` (and to the intermediate shard), or, in the last stage, to the output
shards. Every drop goes to the drop log as "step:reason".

Outputs are renamed into place, then the marker `.done/stage<k>/<task>.json` (holding the
task's statistics) is written: a task with a marker is finished, a task without one is redone
from the start, and since a redone task rewrites the same files with the same bytes, a crash
never loses or duplicates a document.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sourcelm.artifacts import atomic_write_bytes
from sourcelm.data.formats.readers import Rejected, read_file
from sourcelm.data.formats.writers import JsonlZstWriter, ShardWriter, read_jsonl_zst
from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.plan import Plan
from sourcelm.data.pipeline.registry import build_step

REPORT_EVERY = 256  # documents between progress reports


def marker_path(out: Path, stage: int, task: int) -> Path:
    return out / ".done" / f"stage{stage}" / f"{task:05d}.json"


def resolve_marker(out: Path, step_index: int) -> Path:
    return out / ".done" / f"resolve{step_index}.json"


def global_work_dir(out: Path, plan: Plan, step_index: int) -> Path:
    return out / "work" / f"{step_index:02d}-{plan.step_names[step_index]}"


def intermediate_path(out: Path, stage: int, task: int) -> Path:
    return out / "work" / f"stage{stage}" / f"{task:05d}.jsonl.zst"


def drop_log_path(out: Path, stage: int, task: int) -> Path:
    return out / "drops" / f"stage{stage}-{task:05d}.jsonl.zst"


def _new_stats() -> dict:
    return {"docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "drops": collections.Counter(),
            "time_s": 0.0}


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def run_task(plan: Plan, out: str | Path, stage_index: int, task: int,
             report: Callable[[int], None] | None = None) -> dict:
    """Runs one task of one stage and returns its statistics (also stored in its marker)."""
    out = Path(out)
    stage = plan.stages[stage_index]
    steps = [build_step(spec, i) for i, spec in enumerate(plan.steps)]  # fresh: counters are per task
    per_doc = [(steps[i].name, steps[i]) for i in range(stage.start, stage.end)]
    stats: dict[str, dict] = {}
    if stage_index == 0:
        stats["read"] = _new_stats()
    opener = steps[stage.opens_with] if stage.opens_with is not None else None
    if opener is not None:
        stats[opener.name] = _new_stats()
    for name, _ in per_doc:
        stats[name] = _new_stats()

    drops = JsonlZstWriter(drop_log_path(out, stage_index, task))
    read_counters: collections.Counter = collections.Counter()
    n_seen = [0]

    def source_docs() -> Iterator[Document]:
        if stage_index == 0:
            st = stats["read"]
            for f in plan.tasks[task]:
                for item in read_file(Path(f.path), f.source, f.format, read_counters, **f.options):
                    if isinstance(item, Rejected):
                        st["drops"][item.reason] += 1
                        drops.write({"id": item.id, "source": item.source, "url": item.url,
                                     "reason": f"read:{item.reason}"})
                        continue
                    st["docs_out"] += 1
                    st["bytes_out"] += _utf8_len(item.text)
                    yield item
        else:
            for rec in read_jsonl_zst(intermediate_path(out, stage_index - 1, task)):
                yield Document.from_dict(rec)

    def survivors() -> Iterator[Document]:
        opener_dir = global_work_dir(out, plan, stage.opens_with) if opener is not None else None
        timer = time.perf_counter
        for doc in source_docs():
            n_seen[0] += 1
            if report is not None and n_seen[0] % REPORT_EVERY == 0:
                report(REPORT_EVERY)
            size = _utf8_len(doc.text)
            text = doc.text
            dropped = None
            if opener is not None:
                st = stats[opener.name]
                st["docs_in"] += 1
                st["bytes_in"] += size
                t0 = timer()
                reason = opener.decide(doc, opener_dir, task)
                st["time_s"] += timer() - t0
                if reason is not None:
                    dropped = (opener.name, reason)
                else:
                    st["docs_out"] += 1
                    st["bytes_out"] += size
            if dropped is None:
                for name, step in per_doc:
                    st = stats[name]
                    st["docs_in"] += 1
                    st["bytes_in"] += size
                    t0 = timer()
                    result = step.process(doc)
                    st["time_s"] += timer() - t0
                    if isinstance(result, str):
                        dropped = (name, result)
                        break
                    doc = result
                    if doc.text is not text:
                        text = doc.text
                        size = _utf8_len(text)
                    st["docs_out"] += 1
                    st["bytes_out"] += size
            if dropped is not None:
                stats[dropped[0]]["drops"][dropped[1]] += 1
                drops.write({"id": doc.id, "source": doc.source, "url": doc.url,
                             "reason": f"{dropped[0]}:{dropped[1]}"})
                continue
            yield doc

    start = time.perf_counter()
    closer = steps[stage.closes_with] if stage.closes_with is not None else None
    try:
        if closer is not None:
            inter = JsonlZstWriter(intermediate_path(out, stage_index, task))

            def kept() -> Iterator[Document]:
                for doc in survivors():
                    inter.write(doc.to_dict())
                    yield doc

            gen = kept()
            t0 = time.perf_counter()
            closer.collect(gen, global_work_dir(out, plan, stage.closes_with), task)
            for _ in gen:  # whatever collect did not read still belongs to the next stage
                pass
            collect_s = time.perf_counter() - t0
            inter.close()
            written = inter.count
        else:
            shards = ShardWriter(out / "documents", task, plan.output_format, plan.split_by)
            for doc in survivors():
                shards.write(doc)
            shards.close()
            written = sum(w.count for w in shards.writers.values())
        drops.close()
    except BaseException:
        drops.abort()
        raise
    if report is not None:
        report(n_seen[0] % REPORT_EVERY)

    if stage_index == 0:
        stats["read"]["counters"] = dict(read_counters)
    for name, step in [(s.name, s) for s in steps]:
        if name in stats:
            stats[name]["counters"] = {**stats[name].get("counters", {}), **dict(getattr(step, "counters", {}))}
    if closer is not None:
        busy = sum(s["time_s"] for s in stats.values())
        stats[f"{closer.name}.collect"] = {"time_s": max(0.0, collect_s - busy),
                                           "counters": dict(getattr(closer, "counters", {}))}
    for s in stats.values():
        if "drops" in s:
            s["drops"] = dict(s["drops"])
    result = {"stage": stage_index, "task": task, "docs_seen": n_seen[0], "docs_written": written,
              "wall_s": time.perf_counter() - start, "steps": stats}
    atomic_write_bytes(marker_path(out, stage_index, task), json.dumps(result, sort_keys=True).encode())
    return result
