"""C kernels for the CPU (`kernels/*.c`), built on first use: the fused loss's per-chunk step, RMSNorm, the
routed experts' row movements, the router's selection and layout, MLA's rotary embedding, SwiGLU and the
optimizer's AdamW update and gradient norm; and on CPUs with AMX the matmul kernels, whose Python side is
`sourcelm.model.amx`.

Each has a torch twin that stays the reference and the path everywhere else (other devices, other
dtypes, `torch.compile`): `loss.chunk_loss_and_grad`, `norm_rope.RMSNorm`'s own code, the torch
branches of `grouped_experts._Dispatch` / `_Combine`, `moe.Router._select`, `norm_rope.rotate_pairs` and
`grouped_experts.swiglu_torch`. They exist because on the CPU those steps are chains of elementwise
torch kernels, each a pass over a tensor that does not stay in cache, and the kernels make one pass
(what each computes: the comment atop its file). Measured (2 threads, `bench/native_kernels.py`): a
loss chunk of the tiny preset (256 × 8192) bf16 1.6-6.6 ms in torch (its bf16 log-softmax is bimodal
from process to process), 1.4-1.7 ms compiled by inductor, 0.5 ms here; fp32 1.6, 1.5 and 0.6 ms;
RMSNorm [2048, 256] forward + backward 1.5-1.9, 0.5-0.9 and 0.4-0.6 ms; with the row kernels a bf16
routed-expert layer of the tiny preset (forward + backward) 11.5-12.4 ms against 13.4-15.3 with the
torch gathers; SwiGLU of that layer 1.1 ms against 2.1 (1.3 compiled).

The build: the system C compiler (`$CC`, else `cc`) with `-O3 -march=native -fopenmp`, under a second,
once per machine; the library is cached under `$SOURCELM_CACHE` (default `~/.cache/sourcelm`) by a hash
of the sources, the flags, the compiler's version and the CPU's feature flags, and written under a
temporary name then renamed, so ranks that build at the same time do not read a half-written file. It
links the OpenMP runtime torch already loaded (same soname), so the kernels share torch's threads and
thread count. Where no compiler, no OpenMP or no glibc-like loader is there, `available()` is False
(the reason logged once) and the torch code runs. `SOURCELM_NATIVE=0` switches the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from sourcelm.model.hardware import cpu_flags

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
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
NORM_BLOCK = 32  # rows per partial weight-gradient sum in rms_norm.c


def _build() -> Path:
    """Compiles `kernels/*.c` into one library in the cache (if not there yet); returns its path."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)")
    sources = sorted(KERNELS.glob("*.[ch]"))
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
def _library() -> ctypes.CDLL | None:
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
    return _library() is not None


def _tag(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "f32"


def _variant(name: str, *dtypes: torch.dtype):
    return getattr(_library(), "_".join([name, *map(_tag, dtypes)]))


def takes(x: torch.Tensor) -> bool:
    """Whether the kernels take this tensor: on the CPU, bf16 or fp32, outside torch.compile's tracing."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32)
            and not torch.compiler.is_compiling() and available())


# ---------------------------------------------------------------------------------- cross-entropy

def chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor | None,
                        ignore_index: int = -100) -> torch.Tensor:
    """Same contract as `loss.chunk_loss_and_grad`: the summed loss (fp32 scalar); the gradient of that sum
    with respect to the logits written into `grad_out` (same shape and dtype as the logits; may be the
    logits themselves) if given."""
    if not takes(logits):
        raise ValueError(f"the native loss kernel takes bf16 or fp32 CPU logits, not {logits.dtype} on {logits.device}")
    if grad_out is not None and (grad_out.shape != logits.shape or grad_out.dtype != logits.dtype
                                 or not grad_out.is_contiguous()):
        raise ValueError("grad_out must be a contiguous tensor of the logits' shape and dtype")
    logits, labels = logits.contiguous(), labels.to(torch.int64).contiguous()
    rows, vocab = logits.shape
    bad = (labels >= vocab) | ((labels < 0) & (labels != ignore_index))
    if bool(bad.any()):  # the kernel would read outside the row
        raise ValueError(f"label {int(labels[bad][0])} outside [0, {vocab}) (and not the ignore index "
                         f"{ignore_index}): the token shards hold ids the model's vocab_size does not cover")
    row_loss = torch.empty(rows, dtype=torch.float32)
    _variant("cross_entropy_rows", logits.dtype)(
        logits.data_ptr(), labels.data_ptr(), rows, vocab, ignore_index,
        grad_out.data_ptr() if grad_out is not None else None, row_loss.data_ptr())
    return row_loss.sum()


# ---------------------------------------------------------------------------------------- RMSNorm

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        rows2d = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch.empty(rows2d.shape, dtype=out_dtype)
        rstd = torch.empty(rows2d.shape[0], dtype=torch.float32)
        _variant("rms_norm_forward", x.dtype, out_dtype)(rows2d.data_ptr(), weight.data_ptr(), rows2d.shape[0],
                                                         rows2d.shape[1], eps, y.data_ptr(), rstd.data_ptr())
        ctx.save_for_backward(rows2d, weight, rstd)
        ctx.x_shape, ctx.out_dtype = x.shape, out_dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        rows, dim = x.shape
        dy = dy.reshape(rows, dim).to(ctx.out_dtype).contiguous()
        dx = torch.empty_like(x)
        partial = torch.empty((rows + NORM_BLOCK - 1) // NORM_BLOCK, dim, dtype=torch.float32)
        dw = torch.empty(dim, dtype=torch.float32)
        _variant("rms_norm_backward", x.dtype, ctx.out_dtype)(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                                                              dy.data_ptr(), rows, dim, dx.data_ptr(),
                                                              partial.data_ptr(), dw.data_ptr())
        return dx.view(ctx.x_shape), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`norm_rope.RMSNorm`'s forward for a CPU x (bf16 or fp32) and an fp32 weight: fp32 output, or bf16 (the
    fp32 output rounded once, for a norm that feeds bf16 matmuls)."""
    if not (takes(x) and weight.dtype == torch.float32 and weight.device.type == "cpu"
            and out_dtype in (torch.float32, torch.bfloat16)):
        raise ValueError("the native RMSNorm takes a bf16 or fp32 CPU input and an fp32 CPU weight, and writes fp32 "
                         "or bf16")
    return _RMSNorm.apply(x, weight.contiguous(), eps, out_dtype)


# ------------------------------------------------------------------------------------------ RoPE

class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        x4 = x if x.dim() == 4 else x.unsqueeze(1)  # [n0, n1, T, d]; keys come without the head dim
        n0, n1, t, d = x4.shape
        y = torch.empty(x4.shape, dtype=x.dtype)
        _variant("rope_forward", x.dtype)(x4.data_ptr(), n0, n1, t, d, x4.stride(0), x4.stride(1), x4.stride(2),
                                          cos.data_ptr(), sin.data_ptr(), y.data_ptr())
        ctx.save_for_backward(cos, sin)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(dy)
        _variant("rope_backward", dy.dtype)(dy.data_ptr(), dy.numel() // dy.shape[-1], cos.shape[0], dy.shape[-1],
                                            cos.data_ptr(), sin.data_ptr(), dx.data_ptr())
        return dx, None, None


def rope_takes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope` runs this call: a CPU x (bf16 or fp32) [n0, n1, T, d] or [n0, T, d] with unit stride
    along d, and fp32 cos/sin [T, d/2] that need no gradient."""
    return (takes(x) and x.dim() in (3, 4) and x.stride(-1) == 1 and x.shape[-1] % 2 == 0
            and all(c.dtype == torch.float32 and c.device.type == "cpu" and c.is_contiguous() and not c.requires_grad
                    and c.shape == (x.shape[-2], x.shape[-1] // 2) for c in (cos, sin)))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`norm_rope.apply_rope` (the rotated pairs de-interleaved, in x's dtype) as one kernel forward and one
    backward; the call must satisfy `rope_takes`."""
    if not rope_takes(x, cos, sin):
        raise ValueError("the native RoPE takes a [.., T, d] CPU x with unit stride along d and fp32 [T, d/2] cos/sin")
    return _Rope.apply(x, cos, sin)


# ---------------------------------------------------------------------------------------- SwiGLU

class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu):
        rows2d = gu.reshape(-1, gu.shape[-1])  # a view: rows keep gu's row stride
        n = gu.shape[-1] // 2
        h = torch.empty(*gu.shape[:-1], n, dtype=gu.dtype)
        _variant("swiglu_forward", gu.dtype)(rows2d.data_ptr(), rows2d.shape[0], n, rows2d.stride(0), h.data_ptr())
        ctx.save_for_backward(gu)
        return h

    @staticmethod
    def backward(ctx, dh):
        (gu,) = ctx.saved_tensors
        rows2d = gu.reshape(-1, gu.shape[-1])
        dh = dh.to(gu.dtype).contiguous()
        dgu = torch.empty(gu.shape, dtype=gu.dtype)
        _variant("swiglu_backward", gu.dtype)(rows2d.data_ptr(), dh.data_ptr(), rows2d.shape[0], gu.shape[-1] // 2,
                                              rows2d.stride(0), dgu.data_ptr())
        return dgu


def swiglu_takes(gu: torch.Tensor) -> bool:
    """Whether `swiglu` runs this call: a CPU gu (bf16 or fp32) [..., 2n] whose rows have unit stride and one
    row stride (a contiguous tensor, or rows sliced out of a wider one)."""
    if not (takes(gu) and gu.dim() >= 1 and gu.shape[-1] % 2 == 0 and gu.stride(-1) == 1):
        return False
    try:
        gu.view(-1, gu.shape[-1])
    except RuntimeError:
        return False
    return True


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gu = [gate | up] along the last dimension, as one kernel forward and one backward
    (whose gradient comes back in the same [gate | up] layout); the call must satisfy `swiglu_takes`."""
    if not swiglu_takes(gu):
        raise ValueError("the native SwiGLU takes a bf16 or fp32 CPU gu [..., 2n] with unit stride along the last "
                         "dimension")
    return _SwiGLU.apply(gu)


# ------------------------------------------------------------------------------- routed-expert rows

def _checked(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not (takes(t) and t.is_contiguous()):
            raise ValueError(f"the native kernels take contiguous bf16 or fp32 CPU tensors, not {t.dtype} on "
                             f"{t.device}{'' if t.is_contiguous() else ' (non-contiguous)'}: pass `.contiguous()` "
                             f"bf16 or fp32 CPU tensors, or use the torch code")


def _check_index(index: torch.Tensor) -> None:
    if index.dtype != torch.int64 or not index.is_contiguous():
        raise ValueError("the native row kernels take a contiguous int64 index")


def _weights(w: torch.Tensor | None) -> int | None:
    if w is not None and (w.dtype != torch.float32 or not w.is_contiguous()):
        raise ValueError("the native row kernels take contiguous fp32 weights")
    return None if w is None else w.data_ptr()


def gather_rows(src: torch.Tensor, index: torch.Tensor, div: int, weights: torch.Tensor | None,
                dtype: torch.dtype) -> torch.Tensor:
    """out[r] = weights[s] * src[s // div] for s = index[r] (zero row where s is outside [0, rows * div));
    src [rows, dim], index int64 [R], weights fp32 (indexed by s) or None -> [R, dim] in `dtype`."""
    _checked(src)
    _check_index(index)
    if weights is not None and weights.numel() < src.shape[0] * div:
        raise ValueError("gather_rows needs a weight for every slot of src")
    out = torch.empty(index.numel(), src.shape[1], dtype=dtype)
    _variant("gather_rows", src.dtype, dtype)(src.data_ptr(), src.shape[0], index.data_ptr(), div, _weights(weights),
                                              index.numel(), src.shape[1], out.data_ptr())
    return out


def sum_rows(src: torch.Tensor, index: torch.Tensor, k: int, weights: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum over j < k of weights[t*k + j] * src[index[t*k + j]] (zero terms for indices outside
    src), in fp32 and slot order; src [rows, dim], index int64 [T*k], weights fp32 [T*k] or None ->
    [T, dim] in `dtype`."""
    _checked(src)
    _check_index(index)
    if index.numel() % k or (weights is not None and weights.numel() != index.numel()):
        raise ValueError("sum_rows needs k slots per token and one weight per slot")
    out = torch.empty(index.numel() // k, src.shape[1], dtype=dtype)
    _variant("sum_rows", src.dtype, dtype)(src.data_ptr(), src.shape[0], index.data_ptr(), _weights(weights),
                                           out.shape[0], k, src.shape[1], out.data_ptr())
    return out


def slot_dots(src: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """out[s] = <src[index[s]], grad[s // k]> (0 where index[s] is outside src), fp32 [S]; src [rows, dim]
    and grad [S / k, dim] of one dtype."""
    _checked(src, grad)
    _check_index(index)
    if grad.shape != (index.numel() // k, src.shape[1]) or index.numel() % k:
        raise ValueError("slot_dots needs grad [slots / k, dim] for src [rows, dim]")
    out = torch.empty(index.numel(), dtype=torch.float32)
    _variant("slot_dots", src.dtype)(src.data_ptr(), src.shape[0], index.data_ptr(), grad.data_ptr(), index.numel(),
                                     k, src.shape[1], out.data_ptr())
    return out


# ------------------------------------------------------------------------------------------ routing

MAX_EXPERTS = 4096  # routing.c's per-token scratch


def route_takes(scores: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> bool:
    """Whether `route_topk` runs this router: fp32 CPU scores [tokens, E] with E up to MAX_EXPERTS and as
    many experts in the kept groups as the top-k takes (else torch would pick masked experts)."""
    e = scores.shape[-1]
    return (takes(scores) and scores.dtype == torch.float32 and scores.dim() == 2 and e <= MAX_EXPERTS
            and n_group >= 1 and e % n_group == 0 and topk_group <= n_group and top_k <= topk_group * (e // n_group))


def route_topk(scores: torch.Tensor, bias: torch.Tensor, n_group: int, per_group_top: int, topk_group: int,
               top_k: int) -> torch.Tensor:
    """DeepSeek-V3's expert selection (`moe.Router.forward`): int64 [tokens, top_k], best first."""
    if not route_takes(scores, n_group, topk_group, top_k):
        raise ValueError("the native router takes fp32 CPU scores [tokens, E] whose kept groups hold top_k experts")
    scores, bias = scores.contiguous(), bias.to(torch.float32).contiguous()
    out = torch.empty(scores.shape[0], top_k, dtype=torch.int64)
    _library().route_topk(scores.data_ptr(), bias.data_ptr(), scores.shape[0], scores.shape[1], n_group,
                          per_group_top, topk_group, top_k, out.data_ptr())
    return out


def ids_take(ids: torch.Tensor) -> bool:
    """Whether `expert_counts` and `slot_layout` take these expert ids: contiguous int64 on the CPU."""
    return (ids.device.type == "cpu" and ids.dtype == torch.int64 and ids.is_contiguous()
            and not torch.compiler.is_compiling() and available())


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots per expert, int64 [n_experts], of ids [S] (ids < 0: not here; an id >= n_experts is an error)."""
    counts = torch.empty(n_experts, dtype=torch.int64)
    bad = _library().count_experts(ids.data_ptr(), ids.numel(), n_experts, counts.data_ptr())
    if bad:
        raise ValueError(f"{bad} expert ids >= {n_experts}")
    return counts


def slot_layout(ids: torch.Tensor, padded: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`grouped_experts.group_by_expert`'s index maps: groups in expert order, each padded[e] rows long
    (sum = rows), slots in (token, slot) order inside a group -> (copy_of_row [rows], row_of_slot [S])."""
    padded = padded.to(torch.int64).contiguous()
    copy_of_row = torch.empty(rows, dtype=torch.int64)
    row_of_slot = torch.empty(ids.numel(), dtype=torch.int64)
    scratch = torch.empty(2 * padded.numel(), dtype=torch.int64)
    bad = _library().lay_out_slots(ids.data_ptr(), ids.numel(), padded.numel(), padded.data_ptr(), rows,
                                   scratch.data_ptr(), copy_of_row.data_ptr(), row_of_slot.data_ptr())
    if bad:
        raise ValueError(f"{bad} slots with an expert id >= {padded.numel()} or beyond their group's padded size")
    return copy_of_row, row_of_slot


# ------------------------------------------------------------------------------------------- AdamW

def adamw_takes(device: torch.device) -> bool:
    """Whether the AdamW kernel updates flat buffers on this device (the CPU; elsewhere torch's fused AdamW)."""
    return device.type == "cpu" and available()


class AdamWBlocks:
    """The blocks of one optimizer's flat buffers, laid out once for `adamw_blocks` (`kernels/adamw.c`): each
    a slice of the fp32 weights, of the two moments and optionally of the bf16 compute copy, and of one
    gradient, which `step` takes fresh each time (backward makes new ones)."""

    FIELDS = 8  # p, g, m, v, copy, n, grad is bf16, decayed

    def __init__(self, params: list[torch.Tensor], exp_avg: list[torch.Tensor], exp_avg_sq: list[torch.Tensor],
                 copies: list[torch.Tensor | None], decayed: list[bool]):
        for t in [*params, *exp_avg, *exp_avg_sq]:
            if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("adamw_blocks takes contiguous fp32 CPU weights and moments")
        self.desc = np.zeros((len(params), self.FIELDS), dtype=np.int64)
        for i, (p, m, v, c, d) in enumerate(zip(params, exp_avg, exp_avg_sq, copies, decayed)):
            if m.numel() != p.numel() or v.numel() != p.numel() or (c is not None and (
                    c.numel() != p.numel() or c.dtype != torch.bfloat16 or not c.is_contiguous())):
                raise ValueError("adamw_blocks: a block's moments and copy must match its weights")
            self.desc[i] = [p.data_ptr(), 0, m.data_ptr(), v.data_ptr(), 0 if c is None else c.data_ptr(),
                            p.numel(), 0, int(d)]
        self.numel = [p.numel() for p in params]

    def step(self, grads: list[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
             weight_decay: float, step: int, grad_mult: float) -> None:
        """One AdamW step on every block from `grads` (one per block, fp32 or bf16, contiguous), times
        `grad_mult`; decay on the blocks marked decayed."""
        for i, (g, n) in enumerate(zip(grads, self.numel)):
            if g.numel() != n or g.dtype not in (torch.float32, torch.bfloat16) or not g.is_contiguous() \
                    or g.device.type != "cpu":
                raise ValueError(f"adamw_blocks: block {i} needs a contiguous fp32 or bf16 CPU gradient of {n} elements")
            self.desc[i, 1] = g.data_ptr()
            self.desc[i, 6] = g.dtype == torch.bfloat16
        step_size = lr / (1.0 - beta1 ** step)  # in double, rounded once, as torch's fused kernel does
        bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
        _library().adamw_blocks(self.desc.ctypes.data, len(self.numel), lr, beta1, beta2, eps, weight_decay,
                                step_size, bc2_sqrt, grad_mult)


def sum_squares(tensors: list[torch.Tensor]) -> float:
    """Σ x² over contiguous fp32 or bf16 CPU tensors, accumulated in fp64 (thread-count independent)."""
    for t in tensors:
        _checked(t)
    desc = np.array([[t.data_ptr(), t.numel(), t.dtype == torch.bfloat16] for t in tensors], dtype=np.int64)
    total = _library().sum_squares(desc.ctypes.data if len(tensors) else None, len(tensors))
    if total < 0:
        raise MemoryError("sum_squares could not allocate its partial sums")
    return total
