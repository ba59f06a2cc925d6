"""`python -m sourcelm.provenance.replay_rank CONFIG.json --run-dir DIR ...`: one rank of a replay.

The same entry point as `python -m sourcelm.train`, except that the config is the JSON a
checkpoint recorded (`Config.to_dict()`), so it is loaded as a dict and nothing in it is lost in
a conversion.
"""

import argparse
import json
import sys

from sourcelm.train.entry import train_main

parser = argparse.ArgumentParser(prog="python -m sourcelm.provenance.replay_rank")
parser.add_argument("config", help="a resolved config as JSON")
parser.add_argument("--run-dir", required=True)
parser.add_argument("--no-resume", action="store_true")
parser.add_argument("--resume-from")
parser.add_argument("--stop-after", type=int)
parser.add_argument("--ranks-per-node", type=int, default=0)
args = parser.parse_args()
with open(args.config) as f:
    config = json.load(f)
sys.exit(train_main(config, [], args.run_dir, resume=not args.no_resume, resume_from=args.resume_from,
                    stop_after=args.stop_after, ranks_per_node=args.ranks_per_node))
