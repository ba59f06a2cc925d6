"""The build of the C kernels (`csrc/*.c`): compiled on first use into one library, loaded with ctypes.

The build: the system C compiler (`$CC`, else `cc`) with `-O3 -march=native -fopenmp`, under a second,
once per machine; the library is cached under `$SOURCELM_CACHE` (default `~/.cache/sourcelm`) by a hash
of the sources, the flags, the compiler's version and the CPU's feature flags, and written under a
temporary name then renamed, so ranks that build at the same time do not read a half-written file. It
links the OpenMP runtime torch already loaded (same soname), so the kernels share torch's threads and
thread count. Where no compiler, no OpenMP or no glibc-like loader is there, `available()` is False
(the reason logged once) and the torch code runs. `SOURCELM_NATIVE=0` switches the kernels off
(`SOURCELM_KERNELS=torch` switches every kernel off, see `ops.py`).

The Python side of each family: `cpu_fused.py` (loss chunk, RMSNorm, RoPE, SwiGLU), `cpu_moe.py` (router
selection, expert layout, row movements), `cpu_adamw.py` (AdamW, gradient norm), `amx.py` (matmuls on
AMX CPUs). Which of them runs a call is decided in `ops.py` only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from sourcelm.kernels.hardware import cpu_flags

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
if platform.machine() in ("x86_64", "AMD64"):
    FLAGS.append("-mprefer-vector-width=512")  # gcc's default is 256-bit vectors even where AVX-512 is there

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
SIGNATURES = {  # C function -> argument types (these return void)
    "cross_entropy_rows_bf16": [_P, _P, _I, _I, _I, _P, _P],
    "cross_entropy_rows_f32": [_P, _P, _I, _I, _I, _P, _P],
    **{f"rms_norm_forward_{x}_{y}": [_P, _P, _I, _I, _F, _P, _P] for x in ("f32", "bf16") for y in ("f32", "bf16")},
    **{f"rms_norm_backward_{x}_{y}": [_P, _P, _P, _P, _I, _I, _P, _P, _P] for x in ("f32", "bf16")
       for y in ("f32", "bf16")},
    **{f"gather_rows_{s}_{d}": [_P, _I, _P, _I, _P, _I, _I, _P] for s in ("f32", "bf16") for d in ("f32", "bf16")},
    **{f"sum_rows_{s}_{d}": [_P, _I, _P, _P, _I, _I, _I, _P] for s in ("f32", "bf16") for d in ("f32", "bf16")},
    "slot_dots_f32": [_P, _I, _P, _P, _I, _I, _I, _P],
    "slot_dots_bf16": [_P, _I, _P, _P, _I, _I, _I, _P],
    "rope_forward_bf16": [_P, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P],
    "rope_forward_f32": [_P, _I, _I, _I, _I, _I, _I, _I, _P, _P, _P],
    "rope_backward_bf16": [_P, _I, _I, _I, _P, _P, _P],
    "rope_backward_f32": [_P, _I, _I, _I, _P, _P, _P],
    "route_topk": [_P, _P, _I, _I, _I, _I, _I, _I, _P],
    "swiglu_forward_bf16": [_P, _I, _I, _I, _P],
    "swiglu_forward_f32": [_P, _I, _I, _I, _P],
    "swiglu_backward_bf16": [_P, _P, _I, _I, _I, _P],
    "swiglu_backward_f32": [_P, _P, _I, _I, _I, _P],
    "adamw_blocks": [_P, _I, *[_F] * 8],
    "grouped_gemm_forward": [_P, _P, _P, _I, _I, _I, _P, _P],
    "grouped_gemm_input_grad": [_P, _P, _P, _I, _I, _I, _P, _P],
    "grouped_gemm_weight_grad": [_P, _P, _P, _I, _I, _I, _P, _P, _P],
}
RETURNING = {"count_experts": ([_P, _I, _I, _P], _I), "lay_out_slots": ([_P, _I, _I, _P, _I, _P, _P, _P], _I),
             "sum_squares": ([_P, _I], ctypes.c_double), "amx_kernels_ready": ([], ctypes.c_int),
             "causal_attention_forward": ([_P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _P], ctypes.c_int),
             "causal_attention_backward": ([_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _P, _P], ctypes.c_int)}


def _build() -> Path:
    """Compiles `csrc/*.c` into one library in the cache (if not there yet); returns its path."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)")
    sources = sorted(SOURCES.glob("*.[ch]"))
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    text = [p.name + "\n" + p.read_text() for p in sources]
    cpu = " ".join(cpu_flags()) or platform.processor()
    key = hashlib.sha256("\0".join([*text, " ".join(FLAGS), version, cpu]).encode()).hexdigest()
    cache = Path(os.environ.get("SOURCELM_CACHE", Path.home() / ".cache" / "sourcelm")) / "kernels"
    lib = cache / f"sourcelm_kernels-{key[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        c_files = [str(p) for p in sources if p.suffix == ".c"]
        done = subprocess.run([cc, *FLAGS, *c_files, "-o", tmp, "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    if os.environ.get("SOURCELM_NATIVE", "1") == "0":
        log.info("native CPU kernels off (SOURCELM_NATIVE=0): the torch code runs")
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning("native CPU kernels unavailable, the torch code runs instead: %s", err)
        return None
    for name, (args, result) in {**{n: (a, None) for n, a in SIGNATURES.items()}, **RETURNING}.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def available() -> bool:
    """Whether the kernels built and loaded here (see the module docstring)."""
    return library() is not None


def _tag(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "f32"


def variant(name: str, *dtypes: torch.dtype):
    return getattr(library(), "_".join([name, *map(_tag, dtypes)]))


def takes(x: torch.Tensor) -> bool:
    """Whether the kernels take this tensor: on the CPU, bf16 or fp32, outside torch.compile's tracing."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
            and not torch.compiler.is_compiling() and available())


def checked(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not (takes(t) and t.is_contiguous()):
            raise ValueError(f"the native kernels take contiguous bf16 or fp32 CPU tensors, not {t.dtype} on "
                             f"{t.device}{'' if t.is_contiguous() else ' (non-contiguous)'}: pass `.contiguous()` "
                             f"bf16 or fp32 CPU tensors, or use the torch code")
