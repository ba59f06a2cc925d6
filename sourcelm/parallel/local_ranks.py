"""Runs a function on N local processes joined in one gloo process group (tests and benchmarks).

The processes start from a fork server that imported torch once, so each test pays the torch import
once rather than once per rank. `fn(rank, world, *args)` must be a module-level function (the child
imports its module by name, or from its file); its return values come back as a list indexed by rank.
An exception on any rank is raised here with that rank's traceback.

With `links` (a LinkSpec), the ranks run on shaped pretend nodes of `ranks_per_node` ranks each: every
node's ranks inside its own network namespace (sourcelm/parallel/netns.py), gloo on the node's link;
the namespaces are removed when the call returns or fails.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed"])
    return _CTX


def _entry(fn_ref, sys_path, rank, world, init_file, args, results, threads, netns=None):
    import importlib
    import importlib.util
    import sys

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        if netns:  # before gloo starts its threads: they inherit the namespace
            from sourcelm.parallel.netns import IFNAME, enter_namespace

            enter_namespace(netns)
            os.environ["GLOO_SOCKET_IFNAME"] = IFNAME
        # The fork server was started earlier; the caller's import path may have grown since (pytest
        # adds test folders), so the function is imported here, after taking the caller's path.
        sys.path[:] = sys_path
        module_name, module_file, qualname = fn_ref
        try:
            if module_name == "__main__":  # a script: load its file under another name (no main run)
                module_name = "_run_ranks_script"
                raise ModuleNotFoundError(module_name)
            fn = importlib.import_module(module_name)
        except ModuleNotFoundError:  # a test module that pytest imported under a name not on the path
            spec = importlib.util.spec_from_file_location(module_name, module_file)
            fn = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = fn
            spec.loader.exec_module(fn)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        out = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        # plain pickle bytes: tensors travel by value, not as shared-memory handles that die with us
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # reported to the parent with its traceback
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 120.0, threads: int = 1, ranks_per_node: int = 0,
              links=None) -> list:
    """Calls fn(rank, world, *args) on `world` processes; returns the results in rank order.
    links: a LinkSpec to run them on shaped nodes of `ranks_per_node` ranks (see the module docstring)."""
    ctx = _context()
    results = ctx.Queue()
    if links is not None and (ranks_per_node <= 0 or world % ranks_per_node):
        raise ValueError(f"shaped links need ranks_per_node dividing the world {world}, got {ranks_per_node}")
    nodes = nullcontext()
    if links is not None:
        from sourcelm.parallel.netns import ShapedNodes

        nodes = ShapedNodes(world // ranks_per_node, links)
    with tempfile.TemporaryDirectory() as tmp, nodes as net:
        where = [net.names[r // ranks_per_node] if net else None for r in range(world)]
        init_file = os.path.join(tmp, "rendezvous")
        fn_ref = (fn.__module__, sys.modules[fn.__module__].__file__, fn.__qualname__)
        path = list(sys.path)
        procs = [ctx.Process(target=_entry, args=(fn_ref, path, r, world, init_file, args, results, threads,
                                                     where[r]))
                 for r in range(world)]
        for p in procs:
            p.start()
        out, errors, pending = [None] * world, [], set(range(world))
        try:
            deadline = time.monotonic() + timeout
            while pending and not errors:
                try:
                    rank, ok, value = results.get(timeout=0.5)
                except queue.Empty:
                    dead = [r for r in pending if procs[r].exitcode is not None]
                    if dead:  # died before reporting (e.g. could not unpickle its function)
                        errors.append(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result")
                    elif time.monotonic() > deadline:
                        errors.append(f"no result within {timeout} s from ranks {sorted(pending)} (hung?)")
                    continue
                pending.discard(rank)
                if ok:
                    out[rank] = pickle.loads(value)  # from our own child process
                else:
                    errors.append(f"rank {rank}:\n{value}")  # the other ranks may now hang in a collective
        finally:
            for p in procs:
                p.join(timeout=1 if errors else 10)
                if p.is_alive():
                    p.terminate()
                    p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    return out
