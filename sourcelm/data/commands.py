"""Data commands: `curate`, `audit` (and `corpus fetch`, from sourcelm.data.corpus.demo)."""

from __future__ import annotations

import argparse
import os


def register(sub) -> None:
    p = sub.add_parser("curate", help="run a curation pipeline (TOML) over raw data",
                       description="Run a curation pipeline: read, extract, filter, dedup, write shards, "
                                   "drop log, statistics, funnel plot and manifest.")
    p.add_argument("pipeline", help="pipeline TOML, or the name of a shipped one (demo)")
    p.add_argument("--output", "-o", required=True, help="output folder (a rerun resumes it)")
    p.add_argument("--workers", "-w", type=int, default=os.cpu_count() or 1)
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    p.add_argument("--input", "-i", action="append", default=None,
                   help="input glob(s) replacing the pipeline's [[input]] (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=curate_command)

    a = sub.add_parser("audit", help="what happened to one document in a curation run")
    a.add_argument("doc_id")
    a.add_argument("--run", required=True, help="the curation output folder")
    a.set_defaults(func=audit_command)

    try:  # the corpus fetcher lives in its own module
        from sourcelm.data.corpus.demo import register_corpus
    except ImportError:
        return
    register_corpus(sub)


def curate_command(args: argparse.Namespace) -> int:
    from sourcelm.config import ConfigError
    from sourcelm.data.pipeline.executors import make_executor
    from sourcelm.data.pipeline.plan import load_plan
    from sourcelm.data.pipeline.run import run_plan

    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    plan = load_plan(args.pipeline, args.input)
    try:
        executor = make_executor(args.executor, args.workers, args.ray_address)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    files = sum(len(t) for t in plan.tasks)
    print(f"curate {plan.name}: {files} input file(s) in {len(plan.tasks)} task(s), {len(plan.stages)} stage(s), "
          f"{args.executor} executor, {args.workers} worker(s) → {args.output}")
    stats = run_plan(plan, args.output, executor, workers=args.workers, show_progress=not args.no_progress)
    print(f"read {stats['documents_read']:,} documents ({stats['records_rejected']:,} records rejected), "
          f"kept {stats['documents_kept']:,} in {stats['wall_s']:.1f}s")
    for name, st in stats["steps"].items():
        if "docs_in" in st and name != "read":
            top = ", ".join(f"{r} {n:,}" for r, n in sorted(st["drops"].items(), key=lambda kv: -kv[1])[:3])
            print(f"  {name:<20} {st['docs_in']:>9,} → {st['docs_out']:>9,}  {top}")
    print(f"outputs: {args.output}/documents, drops, stats.json, funnel.png, manifest.json")
    return 0


def audit_command(args: argparse.Namespace) -> int:
    from sourcelm.data.pipeline.audit import audit

    code, text = audit(args.run, args.doc_id)
    print(text)
    return code
