"""`sourcelm <command>`: argument parsing only.

Each command lives in the module that owns its concern and exposes `register(subparsers)`, which
adds its parser and sets `func`. Those modules import heavy libraries inside their run functions,
so `sourcelm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command modules, in the order of the data path
COMMAND_MODULES = (
    "sourcelm.data.commands",  # corpus fetch, curate, audit
    "sourcelm.tokens.commands",  # tokenizer train, tokenize
    "sourcelm.model.commands",  # info
    "sourcelm.train.commands",  # train, plot
    "sourcelm.plan.commands",  # plan
    "sourcelm.interop.commands",  # export
    "sourcelm.infer.commands",  # generate
    "sourcelm.provenance.commands",  # verify, card
    "sourcelm.eval.commands",  # eval
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sourcelm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args, extra = parser.parse_known_args(argv)
    # `section.key=value` overrides may also follow the options (`train CFG --run-dir D model.x=1`)
    if extra and getattr(args, "intermixed", False) and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from sourcelm.config import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
