"""Process-level tuning for training on the CPU: `keep_freed_cpu_memory` (see its docstring). Which device
and compute dtype a run uses is `sourcelm.kernels.hardware`."""

from __future__ import annotations

import ctypes
import logging
import platform

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
