"""`python -m sourcelm.train CONFIG [overrides] --run-dir DIR`: one rank of a torchrun job."""

import argparse
import sys

from sourcelm.train.entry import train_main, train_virtual_ranks

parser = argparse.ArgumentParser(prog="python -m sourcelm.train")
parser.add_argument("config")
parser.add_argument("overrides", nargs="*")
parser.add_argument("--run-dir", required=True)
parser.add_argument("--no-resume", action="store_true")
parser.add_argument("--resume-from")
parser.add_argument("--stop-after", type=int)
parser.add_argument("--ranks-per-node", type=int, default=0)
parser.add_argument("--init-from", help="an HF DeepSeek-V3 checkpoint directory to continue training from")
parser.add_argument("--virtual-ranks", type=int, default=0, metavar="V",
                    help="host V ranks of the world as threads of this process (a replay on fewer processes)")
args = parser.parse_args()
train_args = dict(config=args.config, overrides=args.overrides, run_dir=args.run_dir, resume=not args.no_resume,
                  resume_from=args.resume_from, stop_after=args.stop_after, ranks_per_node=args.ranks_per_node,
                  init_from=args.init_from)
sys.exit(train_virtual_ranks(args.virtual_ranks, **train_args) if args.virtual_ranks else train_main(**train_args))
