"""Virtual ranks: several ranks of one gloo world hosted as threads of one process.

A verifier replays a training segment that W processes recorded, on a machine that runs fewer. If
each process hosts W / N of the recorded ranks as threads, every rank does exactly what it did in
the recorded run (the same micro-batches, the same expert rows in the same order, the same kernel
calls) and every collective is the same gloo algorithm over the same W ranks, so every sum happens
in the same order and the replay can reproduce the recorded bits (`sourcelm verify --nproc N`).
What it does not save is memory: the threads hold what the W processes held.

torch.distributed keeps its world (the default group and the group maps) in one module global and
names every group in a process-wide C++ registry. `install()` makes the world per thread, and
registers each thread's groups under a name tagged with its rank: the names themselves must stay the
same on every rank, because the store's rendezvous keys are built from them.

Only gloo on CPU tensors: NCCL allows one rank per GPU, so on GPUs a replay with fewer devices than
the recorded run is not exact this way (it has run on CPU only).
"""

from __future__ import annotations

import datetime
import threading
import traceback

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

_installed = False
_thread = threading.local()  # .rank: the rank this thread hosts


class _RankWorld:
    """The state torch.distributed keeps for one process, kept here for one thread (c10d._World's fields)."""

    def __init__(self):
        self.default_pg = None
        self.pg_map, self.pg_names, self.pg_group_ranks, self.pg_backend_config = {}, {}, {}, {}
        self.group_count = 0
        self.tags_to_pg, self.pg_to_tag, self.pg_coalesce_state = {}, {}, {}
        self.comms, self.pg_config_info = [], []


class _ThreadWorld:
    """Stands in for c10d's module-level `_world`: every attribute is the calling thread's."""

    def _mine(self) -> _RankWorld:
        if not hasattr(_thread, "world"):
            _thread.world = _RankWorld()
        return _thread.world

    def __getattr__(self, name):
        return getattr(self._mine(), name)

    def __setattr__(self, name, value):
        setattr(self._mine(), name, value)


def install() -> None:
    """Makes torch.distributed's world per thread in this process (idempotent). Call before any group exists."""
    global _installed
    if _installed:
        return
    if dist.is_initialized():
        raise RuntimeError("virtual ranks must be installed before this process joins a process group")
    register, unregister = c10d._register_process_group, c10d._unregister_process_group
    c10d._world = _ThreadWorld()
    c10d._register_process_group = lambda name, pg: register(f"{name}@rank{_thread.rank}", pg)
    c10d._unregister_process_group = lambda name: unregister(f"{name}@rank{_thread.rank}")
    _installed = True


def run_thread_ranks(fn, ranks: range, world: int, init_method: str, timeout_s: float = 1800.0) -> list:
    """Runs fn(rank) for each rank of `ranks` in its own thread, each first joined to the gloo world of `world`
    ranks through `init_method` (the other ranks may be threads of other processes). Returns the results in the
    order of `ranks`. A failure is raised at once with its rank and traceback, without waiting for the peers it
    leaves in a collective; those hold gloo threads that abort a normal interpreter exit, so the caller reports the
    error and leaves with os._exit."""
    install()
    results: dict[int, object] = {}
    errors: list[str] = []

    def host(rank: int) -> None:
        _thread.rank = rank
        try:
            dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=timeout_s))
            results[rank] = fn(rank)
            dist.barrier()
        except BaseException:  # reported by the caller, with the rank
            errors.append(f"virtual rank {rank}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=host, args=(r,), name=f"rank{r}", daemon=True) for r in ranks]
    for t in threads:
        t.start()
    running = threads
    while running and not errors:
        running[0].join(timeout=0.2)
        running = [t for t in running if t.is_alive()]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in ranks]
