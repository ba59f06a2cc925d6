"""Which device and which compute dtype a run uses, when the config leaves it to the hardware.

`train.dtype = "auto"` (the default) picks bfloat16 where the hardware multiplies bf16 natively and
float32 elsewhere: on CUDA, devices that support bf16; on CPUs, those with AMX or AVX512-BF16 (read
from /proc/cpuinfo; other systems get float32). Why a hardware rule and not a fixed default: on the
2-core AMX CPU this project is measured on, the tiny preset trains 1.3-1.4x faster in bf16 with
validation loss within seed noise of fp32 (`bench/RESULTS_train.md`), while a CPU without bf16
instructions emulates bf16 matmuls and would run several times slower than in fp32.
The trainer writes the resolved dtype into the run's config and checkpoints, so a replay computes
in the same dtype whatever machine it runs on.

`keep_freed_cpu_memory` tunes glibc's allocator for training on the CPU (see its docstring).
"""

from __future__ import annotations

import ctypes
import logging
import platform
from pathlib import Path

import torch

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 << 20


def resolve_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from sourcelm.config import ConfigError
        raise ConfigError("train.device = 'cuda' but torch sees no CUDA device; set train.device = 'cpu' or 'auto'")
    return torch.device("cuda", torch.cuda.current_device())


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in CPU_BF16_FLAGS)


def resolve_dtype(name: str, device: torch.device) -> str:
    """The concrete compute dtype ("float32" or "bfloat16") for `train.dtype` on `device`."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


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
