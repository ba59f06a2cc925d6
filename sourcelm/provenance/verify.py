"""`sourcelm verify`: the hash walk, the provenance root, optional re-runs, and the table.

The provenance root hash of a run is the SHA-256 of the manifest of its final artifact (the HF
export's manifest.json; without an export, the last checkpoint's). That manifest pins the hash of
every file the export wrote and of the checkpoint manifest it came from, which pins the token
shard manifests and the previous checkpoint, and so on down to the raw corpus files: one hash
that names the whole chain. Publish it next to the weights; `verify --expect-root` checks it.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from sourcelm.provenance.graph import Check, Report, root_hash, walk

STAGE_ORDER = ("corpus", "raw input", "curate", "tokenizer", "tokenize", "checkpoint", "export", "data re-run",
               "provenance")


def verify(run_dir: str | Path, replay: list[int] = (), sample: int = 0, seed: int | None = None,
           data: bool = False, expect_root: str | None = None, show_progress: bool = True,
           nproc: int | None = None, ranks_per_node: int | None = None, layout: str | None = None,
           max_memory: int | None = None) -> Report:
    """Replays (--replay, --sample) run on the recorded layout, or on nproc / ranks_per_node / layout; their records
    go to RUN/verification/ (`vreport.py`)."""
    from sourcelm.provenance.replay import find_segment, segments
    from sourcelm.provenance.segment_check import EXACT, TOLERANCE, check_segment
    from sourcelm.provenance.vreport import sample_seed, sample_segments, sampling_record, write_report

    report = walk(run_dir)
    final = report.final()
    root = root_hash(report) if final is not None else None
    if final is not None:
        if expect_root:
            report.add("provenance", report.rel(final.path), "root hash", root == expect_root.lower(),
                       f"{root} {'==' if root == expect_root.lower() else '!='} expected {expect_root}")
        else:
            report.add("provenance", report.rel(final.path), "root hash", True, note=True,
                       detail=f"sha256:{root} (the SHA-256 of this manifest; it pins the whole chain)")
    chosen = []
    for k in replay:
        try:
            chosen.append(find_segment(report, k))
        except ValueError as e:
            report.add("checkpoint", str(run_dir), "replay", False, str(e))
    sampling = None
    if sample:
        segs = segments(report)
        if not segs:
            report.add("checkpoint", str(run_dir), "replay", False, "--sample: no training run with checkpoints found")
        else:
            # derived from the root the prover published, so the prover cannot choose the segments checked
            seed_from = "--seed" if seed is not None else "the provenance root" if root else "drawn at random"
            seed = seed if seed is not None else sample_seed(root) if root else secrets.randbelow(2**31)
            picked = sample_segments(len(segs), sample, seed)
            sampling = sampling_record(len(segs), sample, seed, seed_from)
            if show_progress:
                print(f"--sample {sample} with seed {seed} ({seed_from}): segments {picked} of {len(segs)}", flush=True)
            chosen += [segs[i] for i in picked if segs[i] not in chosen]
    records = []
    for start, end in chosen:
        rec = check_segment(report, start, end, nproc, ranks_per_node, layout, budget=max_memory,
                            show_progress=show_progress)
        records.append(rec)
        verdict = rec["verdict"]
        report.add(end.stage, report.rel(end.dir), "replay", verdict in (EXACT, TOLERANCE),
                   f"{verdict}: {rec['detail']}" if verdict != EXACT else rec["detail"])
    if records:
        path = write_report(report.run_dir, records, sampling, root)
        report.add("provenance", report.rel(path), "verification report", True, note=True,
                   detail=f"{len(records)} segment check(s): {report.rel(path)} and report.json")
    if data:
        from sourcelm.provenance.data_replay import replay_data

        report.checks += replay_data(report, show_progress=show_progress)
    return report


def _order(check: Check) -> tuple:
    kind = check.stage.split(" ")[0]
    return (STAGE_ORDER.index(kind) if kind in STAGE_ORDER else len(STAGE_ORDER), check.stage, check.path)


def print_report(report: Report) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)  # logs and CI: do not fold at 80 columns
    table = Table(title=f"provenance of {report.run_dir}", show_lines=False)
    for col in ("stage", "artifact", "check", "result"):
        table.add_column(col, overflow="fold")
    for c in sorted(report.checks, key=_order):
        mark = "[yellow]note[/]" if c.note else ("[green]ok[/]" if c.ok else "[bold red]FAIL[/]")
        table.add_row(c.stage, c.path, c.what, f"{mark} {c.detail}")
    console.print(table)
    failed = report.failures
    if failed:
        console.print(f"[bold red]verification FAILED[/]: {len(failed)} of {len(report.checks)} checks")
        for c in failed:
            console.print(f"  [red]✗[/] {c.stage}: {c.path}: {c.detail}")
    else:
        root = root_hash(report)
        console.print(f"[bold green]verified[/]: {len(report.checks)} checks hold"
                      + (f"; provenance root sha256:{root}" if root else ""))
