"""`sourcelm train|sft CONFIG --nproc N --ranks-per-node R`: N local processes as N/R pretend nodes.

It hands the job to torch's elastic launcher (the library behind `torchrun`) in standalone mode,
which starts the ranks with the usual environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)
and runs `python -m sourcelm.train` (for sft, `python -m sourcelm sft`) in each; gloo on CPU. On a real
cluster, run torchrun yourself with the real node boundaries (see the README).

With `--links ib=RATE,nvlink=RATE[,delay=MS]` the ranks start in shaped pretend nodes instead, one
network namespace per node (sourcelm/parallel/netns.py), with the same environment torchrun would give.
"""

from __future__ import annotations

import os
import sys


def launch_local(args, cfg=None, rank_command: list[str] | None = None) -> int:
    """cfg: the resolved config (default: args.config with args.overrides); rank_command: the module and arguments
    each rank runs (default: `sourcelm.train` with the train options of args), to which the rank options are
    added."""
    from sourcelm.config import check_batch_layout, load_config
    from sourcelm.parallel.topology import validate_layout

    # a layout that cannot work fails here, once, instead of in every rank
    cfg = cfg or load_config(args.config, args.overrides)
    m, pp = cfg.model, cfg.parallel.pp
    if args.nproc % pp == 0:  # else validate_layout names parallel.pp
        check_batch_layout(cfg, args.nproc // pp)  # the data-parallel ranks: those of one pipeline stage
    validate_layout(args.nproc, args.ranks_per_node or args.nproc, cfg.parallel.ep, m.n_routed_experts, m.n_group, pp)

    before = os.environ.get("OMP_NUM_THREADS")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N processes share the cores; one BLAS thread each
    try:
        return _start_ranks(args, rank_command)
    finally:  # the ranks' setting, not this process's: a caller that goes on (a test, a notebook) keeps its own
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _start_ranks(args, rank_command: list[str] | None) -> int:
    from torch.distributed.run import get_args_parser, run

    module, *rank_argv = rank_command or ["sourcelm.train", args.config, *args.overrides]
    rank_argv += ["--run-dir", args.run_dir, "--ranks-per-node", str(args.ranks_per_node or args.nproc)]
    if args.no_resume:
        rank_argv.append("--no-resume")
    if args.resume_from:
        rank_argv += ["--resume-from", args.resume_from]
    if args.stop_after is not None:
        rank_argv += ["--stop-after", str(args.stop_after)]
    if getattr(args, "links", None) is not None:
        from sourcelm.parallel.netns import run_in_nodes

        rc = run_in_nodes([sys.executable, "-m", module, *rank_argv], args.nproc,
                          args.ranks_per_node or args.nproc, args.links,
                          env={"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]})
        if rc:
            print(f"training on shaped links failed (exit {rc}); see {args.run_dir}/train*.log")
        return rc
    argv = ["--standalone", f"--nproc-per-node={args.nproc}", "--module", module, *rank_argv]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as e:
        print(f"training failed on rank(s) {sorted(e.failures)}; see {args.run_dir}/train*.log")
        return 1
    return 0
