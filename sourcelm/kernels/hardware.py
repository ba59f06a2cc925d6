"""Which device and which compute dtype a run uses, when the config leaves it to the hardware.

`train.dtype = "auto"` (the default) picks bfloat16 where the hardware multiplies bf16 natively and
float32 elsewhere: on CUDA, devices that support bf16; on CPUs, those with AMX or AVX512-BF16 (read
from /proc/cpuinfo; other systems get float32). Why a hardware rule and not a fixed default: on the
2-core AMX CPU this project is measured on, the tiny preset trains 1.3-1.4x faster in bf16 with
validation loss within seed noise of fp32 (`bench/RESULTS_train.md`), while a CPU without bf16
instructions emulates bf16 matmuls and would run several times slower than in fp32.
The trainer writes the resolved dtype into the run's config and checkpoints, so a replay computes
in the same dtype whatever machine it runs on. Here, under `model/`, because `sourcelm info` needs the
same answer and model code does not import the training code.
"""

from __future__ import annotations

from pathlib import Path

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def resolve_device(name: str) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from sourcelm.config import ConfigError
        raise ConfigError("train.device = 'cuda' but torch sees no CUDA device; set train.device = 'cpu' or 'auto'")
    return torch.device("cuda", torch.cuda.current_device())


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's feature flags as Linux lists them ("flags" on x86, "Features" on Arm); [] elsewhere."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    return next((line.split(":", 1)[1].split() for line in text.splitlines()
                 if line.startswith(("flags", "Features"))), [])


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    return any(f in cpu_flags(cpuinfo) for f in CPU_BF16_FLAGS)


def resolve_dtype(name: str, device: torch.device) -> str:
    """The concrete compute dtype ("float32" or "bfloat16") for `train.dtype` on `device`."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"
