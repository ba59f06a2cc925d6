"""`sourcelm train` and `sourcelm plot`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on token shards",
                       description="Train from a preset or TOML config, with section.key=value overrides.")
    p.add_argument("config", help="preset name (tiny, small, deepseek-v3-671b) or TOML file")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. schedule.steps=50 data.train=['tok/train']")
    p.add_argument("--run-dir", required=True, help="where checkpoints, metrics and plots go")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    p.add_argument("--resume-from", help="a specific checkpoint directory (default: the newest valid one)")
    p.add_argument("--stop-after", type=int,
                   help="stop after this many steps (the schedule still spans schedule.steps)")
    p.add_argument("--nproc", type=int, default=1, help="local processes (expert/data parallel, gloo on CPU)")
    p.add_argument("--ranks-per-node", type=int, default=0,
                   help="split the local processes into pretend nodes of this many ranks (default: one node)")
    p.set_defaults(func=run_train, intermixed=True)  # overrides may follow the options

    p = sub.add_parser("plot", help="write loss / LR / throughput / expert-load PNGs for a run")
    p.add_argument("run_dir")
    p.set_defaults(func=run_plot)


def run_train(args) -> int:
    if args.nproc > 1:
        from sourcelm.parallel.launch import launch_local

        return launch_local(args)
    from sourcelm.train.entry import train_main

    return train_main(args.config, args.overrides, args.run_dir, resume=not args.no_resume,
                      resume_from=args.resume_from, stop_after=args.stop_after)


def run_plot(args) -> int:
    from sourcelm.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0
