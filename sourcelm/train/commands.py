"""`sourcelm train`, `sourcelm sft` and `sourcelm plot`."""

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
    p.add_argument("--links", type=_links, metavar="ib=RATE,nvlink=RATE[,delay=MS]",
                   help="run each pretend node in its own network namespace, inter-node links shaped to ib, "
                        "intra-node traffic to nvlink (default 3.2 x ib), e.g. ib=400mbit,nvlink=1280mbit; needs "
                        "root or CAP_NET_ADMIN (sourcelm/parallel/netns.py)")
    p.add_argument("--init-from", metavar="HF_DIR",
                   help="continue from an HF DeepSeek-V3 checkpoint: its config.json gives the model (overrides still "
                        "apply), each rank reads only the weights it holds; see configs/continue.toml")
    p.set_defaults(func=run_train, intermixed=True)  # overrides may follow the options

    p = sub.add_parser("sft", help="supervised fine-tuning of an HF checkpoint on conversations",
                       description="Fine-tune HF_DIR on chat JSONL ({\"messages\": [{\"role\", \"content\"}, ...]} a "
                                   "line), rendered with HF_DIR's chat template, loss on the assistant's tokens only; "
                                   "see sourcelm/train/sft.py and configs/sft.toml.")
    p.add_argument("config", help="TOML file or preset for the training sections, e.g. configs/sft.toml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. schedule.steps=200 data.seq_len=512")
    p.add_argument("--links", type=_links, metavar="ib=RATE,nvlink=RATE[,delay=MS]",
                   help="run each pretend node in its own network namespace, inter-node links shaped to ib, "
                        "intra-node traffic to nvlink (default 3.2 x ib), e.g. ib=400mbit,nvlink=1280mbit; needs "
                        "root or CAP_NET_ADMIN (sourcelm/parallel/netns.py)")
    p.add_argument("--init-from", required=True, metavar="HF_DIR",
                   help="the HF DeepSeek-V3 checkpoint to fine-tune; its tokenizer and chat template render the chats")
    p.add_argument("--data", required=True, metavar="CHATS_JSONL", help="the conversations, one JSON object a line")
    p.add_argument("--run-dir", required=True, help="where the SFT data, checkpoints, metrics and plots go")
    p.add_argument("--valid-fraction", type=float, default=0.05,
                   help="share of the conversations held out (by a hash of the line) for the validation loss")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    p.add_argument("--resume-from", help="a specific checkpoint directory (default: the newest valid one)")
    p.add_argument("--stop-after", type=int,
                   help="stop after this many steps (the schedule still spans schedule.steps)")
    p.add_argument("--nproc", type=int, default=1, help="local processes (expert/data/pipeline parallel, gloo on CPU)")
    p.add_argument("--ranks-per-node", type=int, default=0,
                   help="split the local processes into pretend nodes of this many ranks (default: one node)")
    p.set_defaults(func=run_sft, intermixed=True)

    p = sub.add_parser("plot", help="write loss / LR / throughput / expert-load PNGs for a run")
    p.add_argument("run_dir")
    p.set_defaults(func=run_plot)


def _links(text: str):
    from sourcelm.parallel.links import links_argument

    return links_argument(text)


def run_train(args) -> int:
    if args.nproc > 1 or args.links:
        from sourcelm.parallel.launch import launch_local

        if args.init_from:
            args = _resolved_for_ranks(args)
        return launch_local(args)
    from sourcelm.train.entry import train_main

    return train_main(args.config, args.overrides, args.run_dir, resume=not args.no_resume,
                      resume_from=args.resume_from, stop_after=args.stop_after, init_from=args.init_from)


def run_sft(args) -> int:
    if args.nproc > 1 or args.links:
        from sourcelm.parallel.launch import launch_local
        from sourcelm.train.init_from import resolve_config

        # each rank runs `sourcelm sft` itself (rank 0 renders the chats, the others wait for it)
        command = ["sourcelm", "sft", args.config, *args.overrides, "--init-from", args.init_from, "--data",
                   args.data, "--valid-fraction", str(args.valid_fraction)]  # launch_local adds the resume options
        return launch_local(args, resolve_config(args.config, args.overrides, args.init_from), command)
    from sourcelm.train.sft import sft_main

    return sft_main(args.config, args.overrides, args.run_dir, args.init_from, args.data,
                    valid_fraction=args.valid_fraction, resume=not args.no_resume, resume_from=args.resume_from,
                    stop_after=args.stop_after, ranks_per_node=args.ranks_per_node)


def _resolved_for_ranks(args) -> argparse.Namespace:
    """For local ranks: the config resolved against the checkpoint once, here, and saved as the JSON the ranks load;
    the base record the ranks find in the run directory tells them where the weights are (`init_from.py`)."""
    from pathlib import Path

    from sourcelm.artifacts import atomic_write_bytes
    from sourcelm.train.init_from import BASE_DIR, record_base, resolve_config

    run = Path(args.run_dir)
    cfg = resolve_config(args.config, args.overrides, args.init_from)
    record_base(run, args.init_from)
    resolved = run / BASE_DIR / "train_config.json"
    atomic_write_bytes(resolved, (cfg.to_json() + "\n").encode())
    return argparse.Namespace(**{**vars(args), "config": str(resolved), "overrides": [], "init_from": None})


def run_plot(args) -> int:
    from sourcelm.train.plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0
