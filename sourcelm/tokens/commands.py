"""`sourcelm tokenizer train` and `sourcelm tokenize`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

INPUT_HELP = ("curated dir (output of `sourcelm curate`), or a file or folder of plain JSONL (.jsonl, .jsonl.gz, "
              ".jsonl.zst), Parquet and text files (.txt, .md, .rst; one document each)")


def register(sub: argparse._SubParsersAction) -> None:
    tk = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on curated documents")
    tk_sub = tk.add_subparsers(dest="tokenizer_command", metavar="COMMAND")
    train = tk_sub.add_parser("train", help="train on curated documents or plain JSONL / Parquet / text files")
    train.add_argument("--input", required=True, help=INPUT_HELP)
    train.add_argument("--text-key", default="text", help="plain JSONL / Parquet: the field holding the text")
    train.add_argument("--vocab-size", type=int, required=True, help="total vocabulary, special tokens included")
    train.add_argument("--output", required=True, help="dir for tokenizer.json and the transformers config files")
    train.add_argument("--heldout-fraction", type=float, default=0.02,
                       help="documents (by id hash) kept out of training for the compression report")
    train.add_argument("--min-frequency", type=int, default=2, help="a merge needs at least this many occurrences")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=run_tokenizer_train)
    tk.set_defaults(func=lambda args: (tk.print_help(), 2)[1])

    tz = sub.add_parser("tokenize", help="documents (curated, or plain JSONL / Parquet / text) -> Megatron .bin/.idx")
    tz.add_argument("--input", required=True, help=INPUT_HELP)
    tz.add_argument("--text-key", default="text", help="plain JSONL / Parquet: the field holding the text")
    tz.add_argument("--tokenizer", required=True, help="dir written by `sourcelm tokenizer train`")
    tz.add_argument("--output", required=True, help="tokens dir; shards go to OUTPUT/train and OUTPUT/valid")
    tz.add_argument("--workers", type=int, default=1, help="parallel tasks (processes or Ray CPUs)")
    tz.add_argument("--executor", choices=("local", "ray"), default="local")
    tz.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    tz.add_argument("--valid-fraction", type=float, default=0.01, help="documents held out (by id hash)")
    tz.add_argument("--batch-size", type=int, default=1000, help="documents per encode_batch call")
    tz.add_argument("--no-progress", action="store_true")
    tz.set_defaults(func=run_tokenize)


def run_tokenizer_train(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from sourcelm.tokens.tokenizer import train_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = train_tokenizer(args.input, args.vocab_size, args.output, heldout_fraction=args.heldout_fraction,
                                 min_frequency=args.min_frequency, show_progress=not args.no_progress,
                                 text_key=args.text_key)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    console = Console()
    console.print(f"vocabulary: {report['vocab_size']} (asked {report['requested_vocab_size']}); "
                  f"held-out documents: {report['heldout_documents']}, bytes/token {report['bytes_per_token']}, "
                  f"round-trip failures: {report['roundtrip_failures']}")
    for kind in ("per_language", "per_source"):
        table = Table(title=f"compression {kind.replace('_', ' ')} (held out)")
        for col in ("", "documents", "bytes", "tokens", "bytes/token"):
            table.add_column(col)
        for key, s in report[kind].items():
            table.add_row(key, str(s["documents"]), str(s["bytes"]), str(s["tokens"]), str(s["bytes_per_token"]))
        console.print(table)
    if report["skipped_documents"]:
        console.print(f"skipped documents: {report['skipped_documents']}")
    console.print(f"saved to {args.output} (report.json, manifest.json)")
    return 0


def run_tokenize(args) -> int:
    from sourcelm.tokens.tokenize import tokenize

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = tokenize(args.input, args.tokenizer, args.output, workers=args.workers, executor=args.executor,
                           valid_fraction=args.valid_fraction, batch_size=args.batch_size,
                           ray_address=args.ray_address, show_progress=not args.no_progress,
                           text_key=args.text_key)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0
