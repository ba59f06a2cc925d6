"""`sourcelm verify RUN_DIR [--replay K] [--sample N] [--nproc N] [--layout ..] [--data]`; `sourcelm card RUN_DIR`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="check the provenance chain of a run, from the weights back to the raw bytes",
                       description="Walk the hash-linked manifests from the final artifacts (HF export, last "
                                   "checkpoint) back to the raw inputs and check every hash; optionally re-run "
                                   "training segments or the data stages and compare the bits. Exit 0 only if "
                                   "everything holds.")
    p.add_argument("run_dir", help="the run folder (e.g. runs/demo), or any folder holding manifests")
    p.add_argument("--replay", type=int, action="append", metavar="K",
                   help="re-run training from checkpoint step K (0: from the init) to the next checkpoint and "
                        "compare bit for bit (repeatable)")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="replay N segments picked by a seed derived from the provenance root")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for --sample (default: the first 8 bytes of the provenance root hash)")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="replay on N processes (default: the layout the run recorded); N dividing the recorded "
                        "process count hosts the recorded ranks as threads (virtual ranks: the same sums, an exact "
                        "verdict); with --layout a real layout of N ranks, judged within a threshold calibrated by "
                        "a second replay on another layout where it is not exact")
    p.add_argument("--ranks-per-node", type=int, default=None, metavar="R", help="pretend nodes of R processes")
    p.add_argument("--layout", default=None, metavar="pp=..,ep=..",
                   help="parallel settings of the replay (pp, ep, pp_schedule, dispatcher, zero1)")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="memory the replay may use (default: what the machine has available); a layout that needs "
                        "more is refused before it runs")
    p.add_argument("--data", action="store_true",
                   help="re-run curation, tokenizer training and tokenization from the raw inputs and compare hashes")
    p.add_argument("--expect-root", metavar="SHA256", help="fail unless the provenance root hash is this one")
    p.add_argument("--quiet", action="store_true", help="no progress output from the re-runs")
    p.set_defaults(func=run_verify)

    c = sub.add_parser("card", help="write the model card (Markdown) of a run")
    c.add_argument("run_dir")
    c.add_argument("--output", help="where to write it (default: RUN_DIR/MODEL_CARD.md)")
    c.set_defaults(func=run_card)


def run_verify(args) -> int:
    from sourcelm.provenance.verify import print_report, verify

    report = verify(args.run_dir, replay=args.replay or [], sample=args.sample, seed=args.seed, data=args.data,
                    expect_root=args.expect_root, show_progress=not args.quiet, nproc=args.nproc,
                    ranks_per_node=args.ranks_per_node, layout=args.layout,
                    max_memory=int(args.max_memory * 2**30) if args.max_memory is not None else None)
    print_report(report)
    return 0 if report.ok else 1


def run_card(args) -> int:
    from pathlib import Path

    from sourcelm.provenance.card import write_card

    path = write_card(Path(args.run_dir), Path(args.output) if args.output else None)
    print(f"model card: {path}")
    return 0
