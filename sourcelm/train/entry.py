"""The process entry point of a training run, for one process or one rank of many.

`sourcelm train` calls it directly (one process) or through the local launcher (several);
`torchrun ... -m sourcelm.train CONFIG ...` calls it once per rank on a cluster. Whether the
process is one rank of many is read from the environment torchrun sets (WORLD_SIZE, RANK, ...).
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


def make_context(cfg, ranks_per_node: int = 0):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from sourcelm.train.distributed import DistributedContext

        return DistributedContext(cfg, ranks_per_node=ranks_per_node)
    from sourcelm.config import ConfigError
    from sourcelm.train.context import SingleProcess

    if cfg.parallel.pp > 1:
        raise ConfigError(f"parallel.pp = {cfg.parallel.pp} needs {cfg.parallel.pp} processes or more: launch with "
                          f"--nproc (a multiple of {cfg.parallel.pp}) or torchrun, or set parallel.pp = 1")
    return SingleProcess()


def train_main(config: str, overrides: list[str], run_dir: str, resume: bool = True, resume_from: str | None = None,
               stop_after: int | None = None, ranks_per_node: int = 0, init_from: str | None = None) -> int:
    """init_from: an HF checkpoint directory to continue from (`init_from.py`); a run directory that already
    records one starts from it too, unless it has a checkpoint to resume."""
    from sourcelm.config import load_config
    from sourcelm.train.checkpoint import newest_valid_checkpoint
    from sourcelm.train.init_from import BaseWeights, record_base, recorded_base, resolve_config
    from sourcelm.train.loop import TooManyBadSteps, Trainer

    cfg = resolve_config(config, overrides, init_from) if init_from else load_config(config, overrides)
    ctx = make_context(cfg, ranks_per_node)
    run = Path(run_dir)
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
    if ctx.is_main and trainer.state.step == cfg.schedule.steps:
        from sourcelm.train.plot import plot_run

        plot_run(run)
    return 0
