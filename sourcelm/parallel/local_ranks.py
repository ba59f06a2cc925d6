"""Runs a function on N local processes joined in one gloo process group (tests and benchmarks).

The processes start from a fork server that imported torch once, so each test pays the torch import
once rather than once per rank. `fn(rank, world, *args)` must be importable (a module-level function);
its return values come back as a list indexed by rank. An exception on any rank is raised here with
that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed"])
    return _CTX


def _entry(fn, rank, world, init_file, args, results, threads):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        # plain pickle bytes: tensors travel by value, not as shared-memory handles that die with us
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # reported to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 120.0, threads: int = 1) -> list:
    """Calls fn(rank, world, *args) on `world` processes; returns the results in rank order."""
    ctx = _context()
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init_file, args, results, threads))
                 for r in range(world)]
        for p in procs:
            p.start()
        out, errors = [None] * world, []
        try:
            for _ in range(world):
                rank, ok, value = results.get(timeout=timeout)
                if ok:
                    out[rank] = pickle.loads(value)  # from our own child process
                else:
                    errors.append(f"rank {rank}:\n{value}")
                    break  # the other ranks may now hang in a collective
        except queue.Empty:
            errors.append(f"no result within {timeout} s (a rank hung or died)")
        finally:
            for p in procs:
                p.join(timeout=1 if errors else 10)
                if p.is_alive():
                    p.terminate()
                    p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return out
