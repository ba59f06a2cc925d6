"""The process entry point of a training run, for one process or one rank of many.

`sourcelm train` calls it directly (one process) or through the local launcher (several);
`torchrun ... -m sourcelm.train CONFIG ...` calls it once per rank on a cluster. Whether the
process is one rank of many is read from the environment torchrun sets (WORLD_SIZE, RANK, ...).
With `--virtual-ranks V` the process hosts V ranks as threads instead (`train_virtual_ranks`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path


def setup_logging(run_dir: Path, rank: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [
        logging.FileHandler(run_dir / ("train.log" if rank == 0 else f"train.rank{rank}.log"))]
    if rank == 0:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)


def make_context(cfg, ranks_per_node: int = 0, joined: bool = False):
    """joined: this thread already joined its process group (a virtual rank)."""
    if joined or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from sourcelm.train.distributed import DistributedContext

        return DistributedContext(cfg, ranks_per_node=ranks_per_node)
    from sourcelm.config import ConfigError
    from sourcelm.train.context import SingleProcess

    if cfg.parallel.pp > 1:
        raise ConfigError(f"parallel.pp = {cfg.parallel.pp} needs {cfg.parallel.pp} processes or more: launch with "
                          f"--nproc (a multiple of {cfg.parallel.pp}) or torchrun, or set parallel.pp = 1")
    return SingleProcess()


def train_main(config: str, overrides: list[str], run_dir: str, resume: bool = True, resume_from: str | None = None,
               stop_after: int | None = None, ranks_per_node: int = 0, init_from: str | None = None,
               virtual_rank: bool = False) -> int:
    """init_from: an HF checkpoint directory to continue from (`init_from.py`); a run directory that already
    records one starts from it too, unless it has a checkpoint to resume. virtual_rank: called by
    `train_virtual_ranks` in a rank's thread (joined, logging already set up)."""
    from sourcelm.config import load_config
    from sourcelm.train.checkpoint import newest_valid_checkpoint
    from sourcelm.train.init_from import BaseWeights, record_base, recorded_base, resolve_config
    from sourcelm.train.loop import TooManyBadSteps, Trainer

    cfg = resolve_config(config, overrides, init_from) if init_from else load_config(config, overrides)
    ctx = make_context(cfg, ranks_per_node, joined=virtual_rank)
    run = Path(run_dir)
    if not virtual_rank:
        setup_logging(run, ctx.rank)
    if init_from and ctx.is_main:
        record_base(run, init_from)
    base = init_from or recorded_base(run)
    resuming = resume_from or (resume and newest_valid_checkpoint(run / "checkpoints") is not None)
    trainer = Trainer(cfg, run, ctx, base=BaseWeights(base) if base and not resuming else None)
    if resume_from:
        trainer.resume(Path(resume_from))
    elif resume:
        trainer.resume()
    if base and not resuming and trainer.valid_data is not None:  # where the continued run starts from
        losses = trainer.validate()
        losses = losses if isinstance(losses, dict) else {"valid_loss": losses}  # a float before per-source losses
        logging.getLogger("sourcelm.train").info("validation loss of the base checkpoint %s: %.4f", base,
                                                 losses["valid_loss"])
        trainer.metrics.log({"kind": "base", "step": 0, **losses})
    try:
        trainer.fit(stop_after=stop_after)
    except TooManyBadSteps as e:
        logging.getLogger("sourcelm.train").error("%s", e)
        return 3
    if ctx.is_main and trainer.state.step == cfg.schedule.steps and cfg.logging.plots:
        from sourcelm.train.plot import plot_run

        plot_run(run)
    return 0


def train_virtual_ranks(ranks_per_process: int, **train_args) -> int:
    """Hosts `ranks_per_process` ranks of the training world as threads of this process
    (`sourcelm.parallel.thread_ranks`): process p of P (torchrun's RANK and WORLD_SIZE; one process without them)
    hosts ranks p·V .. p·V + V − 1 of a world of P·V, so a layout recorded on P·V processes runs, with the same
    reductions, on P. Each rank's ops split their work over the process's intra-op thread count (OMP_NUM_THREADS;
    the replay sets the recorded one); only one thread per rank has been run this way."""
    import tempfile

    from sourcelm.parallel.thread_ranks import run_thread_ranks

    process, processes = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    first = process * ranks_per_process
    setup_logging(Path(train_args["run_dir"]), first)  # one log per process, named after its first rank
    # the processes of one launch share torchrun's run id, so they meet at the same rendezvous file
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or f"pid{os.getpid()}"
    init = Path(tempfile.gettempdir()) / f"sourcelm-virtual-ranks-{run_id}"
    try:
        codes = run_thread_ranks(lambda rank: train_main(**train_args, virtual_rank=True),
                                 range(first, first + ranks_per_process), processes * ranks_per_process,
                                 f"file://{init}")
    except RuntimeError as e:  # a rank failed; its peers wait in a collective that will never complete
        logging.getLogger("sourcelm.train").error("%s", e)
        logging.shutdown()
        os._exit(1)
    return max(codes)
