"""Process-level tuning for training: `keep_freed_cpu_memory` (on the CPU) and `collect_between_steps` (Python's
garbage collector, on any device; see their docstrings). Which device and compute dtype a run uses is
`sourcelm.kernels.hardware`."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import platform
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_cpu_memory() -> bool:
    """Makes glibc keep freed blocks below 32 MiB in the process heap instead of handing them back to the
    kernel. A training step on the CPU allocates and frees hundreds of 1-8 MB activations; by default glibc
    serves blocks above its (adaptive) mmap threshold with a fresh mmap and unmaps them on free, so every
    step faults the same pages in again, zero-filled. How often depends on the allocation history, through
    glibc's adaptive threshold. Measured on the tiny preset (2 cores, bf16): 4-6k page faults per step or,
    after a small change in what a step allocates, 27k (steps 7-12 % slower); with this setting, 3k every
    time. The cost: the heap keeps its high-water mark (the peak RSS is unchanged). Returns whether the
    setting took (False off glibc, e.g. macOS or musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # a fixed mmap threshold also stops glibc adapting the trim threshold, so set both
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    log.debug("glibc malloc: blocks under %d MiB stay in the heap: %s", MMAP_THRESHOLD_MAX >> 20, ok)
    return ok


@contextlib.contextmanager
def collect_between_steps(every: int) -> Iterator[Callable[[int, bool], None]]:
    """Python's garbage collector only between training steps, inside the `with`; yields `after_step(step,
    checkpointed)`, to be called once a step is done. Outside, the collector is as it was.

    Left to itself the collector pauses wherever allocations cross its thresholds, inside any op of any rank.
    Measured on one process, 2 cores, 16 micro-batches a step: an 8-layer model of hidden 128 took ~20 young
    collections a step of up to 1 ms each, and in 20 steps one full collection of 110-150 ms, which scanned the
    ~215k objects the imports and the model left (16 layers of hidden 256: one of 140 ms in 6 steps). In a pipeline
    or an all-to-all, a pause on one rank is idle time on the others. So: the objects tracked at the start are frozen
    (`gc.freeze`: no collection scans them again), automatic collection is off, the young generations are collected
    every `every` steps (the first such collection took 45 ms, later ones under 0.1 ms; the objects tracked did not
    grow over 40 steps), and a full collection runs after each checkpoint, a pause every rank takes anyway. The
    ranks one process hosts as threads (`--virtual-ranks`) share the collector: it is back on once the rank that
    turned it off is done. `every` = 0: the automatic collector. The same choice as torchtitan's `gc_freq` and
    Megatron's `--manual-gc`; it changes no bits.
    """
    if every <= 0:
        yield lambda step, checkpointed: None
        return
    was_enabled = gc.isenabled()
    gc.freeze()  # garbage among them waits for the run's end: collecting it first would scan them all (0.1-0.2 s)
    gc.disable()

    def after_step(step: int, checkpointed: bool) -> None:
        if checkpointed:
            gc.collect()
        elif step % every == 0:
            gc.collect(1)

    try:
        yield after_step
    finally:
        gc.unfreeze()  # a later collection may free what this run leaves behind (tests train many runs a process)
        if was_enabled:
            gc.enable()
