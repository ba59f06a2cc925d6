"""Executors: run the pending tasks of one stage, in parallel, and report progress.

- `LocalExecutor`: a multiprocessing pool on this machine (the default). Workers die with the
  parent (PR_SET_PDEATHSIG on Linux), so a killed run leaves no orphan writing files.
- `RayExecutor`: Ray tasks; starts a local Ray instance unless given the address of a cluster
  (then the output folder must be on storage every node sees).

Both run the same `run_task`, whose outputs depend only on (plan, stage, task): the two give
byte-identical shards and drop logs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
from collections.abc import Callable
from pathlib import Path

from sourcelm.data.pipeline.plan import Plan
from sourcelm.data.pipeline.task import run_task

_progress_queue = None


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _init_worker(q) -> None:
    global _progress_queue
    _progress_queue = q
    _die_with_parent()


def _report(n: int) -> None:
    if _progress_queue is not None and n:
        _progress_queue.put(n)


def _pool_task(args):
    plan, out, stage, task = args
    return run_task(plan, out, stage, task, report=_report)


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self._pool = None
        self._queue = None

    def start(self) -> None:
        """Forks the workers; called before any progress display thread exists."""
        if self.workers > 1 and self._pool is None:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self._queue = ctx.Queue()
            self._pool = ctx.Pool(self.workers, initializer=_init_worker, initargs=(self._queue,))

    def run_stage(self, plan: Plan, out: Path, stage: int, tasks: list[int],
                  advance: Callable[[int], None], task_done: Callable[[dict], None]) -> list[dict]:
        if self.workers == 1:
            results = []
            for t in tasks:
                r = run_task(plan, out, stage, t, report=advance)
                task_done(r)
                results.append(r)
            return results
        self.start()
        pending = [self._pool.apply_async(_pool_task, ((plan, str(out), stage, t),)) for t in tasks]
        results = []
        while pending:
            try:
                advance(self._queue.get(timeout=0.1))
                continue
            except queue.Empty:
                pass
            still = []
            for p in pending:
                if p.ready():
                    r = p.get()  # re-raises a worker's exception here
                    task_done(r)
                    results.append(r)
                else:
                    still.append(p)
            pending = still
        while True:  # late progress messages
            try:
                advance(self._queue.get_nowait())
            except queue.Empty:
                break
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None


class RayExecutor:
    name = "ray"

    def __init__(self, workers: int = 1, address: str | None = None):
        self.workers = max(1, int(workers))
        self.address = address
        self._started = False

    def start(self) -> None:
        import ray

        if ray.is_initialized():
            return
        package_root = str(Path(__file__).resolve().parents[3])
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}}
        if self.address:
            ray.init(address=self.address, runtime_env=env, log_to_driver=True)
        else:
            ray.init(num_cpus=self.workers, include_dashboard=False, runtime_env=env, log_to_driver=True)
        self._started = True

    def run_stage(self, plan: Plan, out: Path, stage: int, tasks: list[int],
                  advance: Callable[[int], None], task_done: Callable[[dict], None]) -> list[dict]:
        import ray

        self.start()
        remote = ray.remote(num_cpus=1, max_retries=2)(run_task)
        plan_ref = ray.put(plan)
        pending = [remote.remote(plan_ref, str(out), stage, t) for t in tasks]
        results = []
        while pending:  # Ray tasks report when they finish (documents and time come in the result)
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in done:
                r = ray.get(ref)
                advance(r["docs_seen"])
                task_done(r)
                results.append(r)
        return results

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


def make_executor(kind: str, workers: int, address: str | None = None):
    if kind == "local":
        if address:
            raise ValueError("--ray-address needs --executor ray")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise ValueError(f"executor {kind!r}: use local or ray")
