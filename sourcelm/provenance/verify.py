"""`sourcelm verify`: the hash walk, the provenance root, optional re-runs, and the table.

The provenance root hash of a run is the SHA-256 of the manifest of its final artifact (the HF
export's manifest.json; without an export, the last checkpoint's). That manifest pins the hash of
every file the export wrote and of the checkpoint manifest it came from, which pins the token
shard manifests and the previous checkpoint, and so on down to the raw corpus files: one hash
that names the whole chain. Publish it next to the weights; `verify --expect-root` checks it.
"""

from __future__ import annotations

import random
import secrets
from pathlib import Path

from sourcelm.provenance.graph import Check, Report, root_hash, walk

STAGE_ORDER = ("corpus", "raw input", "curate", "tokenizer", "tokenize", "checkpoint", "export", "data re-run",
               "provenance")


def verify(run_dir: str | Path, replay: list[int] = (), sample: int = 0, seed: int | None = None,
           data: bool = False, expect_root: str | None = None, show_progress: bool = True) -> Report:
    from sourcelm.provenance.replay import find_segment, replay_segment, segments

    report = walk(run_dir)
    final = report.final()
    if final is not None:
        root = root_hash(report)
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
    if sample:
        segs = segments(report)
        if not segs:
            report.add("checkpoint", str(run_dir), "replay", False, "--sample: no training run with checkpoints found")
        else:
            seed = secrets.randbelow(2**31) if seed is None else seed
            picked = random.Random(seed).sample(range(len(segs)), min(sample, len(segs)))
            if show_progress:
                print(f"--sample {sample} with --seed {seed}: segments {sorted(picked)} of {len(segs)}", flush=True)
            chosen += [segs[i] for i in sorted(picked) if segs[i] not in chosen]
    for start, end in chosen:
        report.checks.append(replay_segment(report, start, end, show_progress=show_progress))
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
