"""The dispatch point: one function per op, the only place that decides which implementation runs a call.

The model, the optimizer and the loss call these and nothing else; each op picks, per call, the first
backend that takes it and logs each (op, backend, device, dtype) choice once:

| op | backends, in order of preference | reference |
|---|---|---|
| `rms_norm`, `rope`, `swiglu` | C (`cpu_fused`), torch | `reference.rms_norm` / `rotate_pairs` / `swiglu` |
| `cross_entropy_chunk` | C (`cpu_fused`), torch | `reference.chunk_loss_and_grad` |
| `route_topk` | C (`cpu_moe`), torch | `reference.route_topk` |
| `group_by_expert`, `dispatch_rows`, `combine_rows` | C (`cpu_moe`), torch | `moe_rows`' torch branches |
| `expert_ffn` | AMX grouped matmul, bmm (equal groups), `torch._grouped_mm`, per-expert loop | `reference.grouped_linear_loop` |
| `causal_attention` | AMX, bmm (short, CPU), sdpa; or as `model.attn_impl` says | `reference.eager_causal_attention` |
| `linear` (and `expert_ffn` under FP8) | FP8 (`train.fp8`: `fp8.fp8_linear`), torch | `F.linear` |
| `swiglu_linear` (an FFN's down projection) | FP8 (`fp8.fp8_swiglu_linear`), `swiglu` then `linear` | both |
| `attention_output` (the core and o_proj) | FP8 (`fp8_attention`), `causal_attention` then `linear` | both |
| `adamw_backend` | C (`cpu_adamw`), torch's fused AdamW | `torch._fused_adamw_` |

The C and AMX kernels run on the CPU only; CUDA runs torch's own kernels (flash attention, grouped_mm,
cuBLAS), which are the GPU's fast paths. Only the CPU branches have run so far: the CUDA ones, and the FP8
"cuda" backend, have not yet run on a GPU. `SOURCELM_KERNELS=torch` switches every hand-written kernel off
(the torch code above runs everywhere: the way to check a result against the reference end to end);
`SOURCELM_NATIVE=0` / `SOURCELM_AMX=0` switch off the C kernels / only the AMX ones. Inside
`deferring_weight_grads` the backward of `linear` and of `expert_ffn`'s grouped GEMMs leaves the weight gradients
for later (the pipeline's zero-bubble W split, `sourcelm.train.weight_grad`).
"""  # noqa: E501 (a markdown table row cannot wrap)

from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch
import torch.nn.functional as F

from sourcelm.kernels import amx, attention, build, cpu_fused, cpu_moe, expert_matmul, moe_rows, reference
from sourcelm.kernels.moe_rows import GroupedLayout

log = logging.getLogger(__name__)

MODES = ("auto", "torch")
BMM_SCORES_BUDGET = 64 << 20  # bytes of one layer's [B, heads, T, T] scores up to which "auto" picks "bmm" on CPU
_logged: set[tuple] = set()


def mode() -> str:
    """`SOURCELM_KERNELS`: "auto" (the default: the fastest backend that takes each call) or "torch"."""
    value = os.environ.get("SOURCELM_KERNELS", "auto")
    if value not in MODES:
        raise ValueError(f"SOURCELM_KERNELS={value!r}: use one of {MODES}")
    return value


def _chose(op: str, backend: str, x: torch.Tensor | None = None, device: torch.device | None = None):
    where = f"{x.device.type} {str(x.dtype).removeprefix('torch.')}" if x is not None else device.type
    key = (op, backend, where)
    if key not in _logged:
        _logged.add(key)
        log.info("kernel %s on %s: %s", op, where, backend)


def _native(x: torch.Tensor) -> bool:
    """Whether the C kernels may take x (CPU, bf16/fp32, not under torch.compile's tracing, built here)."""
    return mode() == "auto" and build.takes(x)


def native_runs(device: torch.device) -> bool:
    """Whether the C kernels run the elementwise ops on `device` (what `DeepseekV3.compile_blocks` asks)."""
    return mode() == "auto" and device.type == "cpu" and build.available()


# ------------------------------------------------------------------------------- norms and activations

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm (`reference.rms_norm`), its result rounded to `out_dtype` when given (a norm feeding bf16 matmuls)."""
    if (weight.dtype == torch.float32 and weight.device.type == "cpu" and _native(x)
            and out_dtype in (None, torch.float32, torch.bfloat16)):
        _chose("rms_norm", "C", x)
        return cpu_fused.rms_norm(x, weight, eps, out_dtype or torch.float32)
    _chose("rms_norm", "torch", x)
    y = reference.rms_norm(x, weight, eps)
    return y if out_dtype is None else y.to(out_dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA's rotary embedding on interleaved pairs, written de-interleaved (`reference.rotate_pairs`)."""
    if mode() == "auto" and cpu_fused.rope_takes(x, cos, sin):
        _chose("rope", "C", x)
        return cpu_fused.rope(x, cos, sin)
    _chose("rope", "torch", x)
    return reference.rotate_pairs(x, cos, sin)


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gu = [gate | up] (`reference.swiglu`)."""
    if mode() == "auto" and cpu_fused.swiglu_takes(gu):
        _chose("swiglu", "C", gu)
        return cpu_fused.swiglu(gu)
    _chose("swiglu", "torch", gu)
    return reference.swiglu(gu)


def cross_entropy_chunk(device: torch.device):
    """The fused loss's per-chunk step for `device` (`reference.chunk_loss_and_grad`'s contract)."""
    if native_runs(device):
        _chose("cross_entropy_chunk", "C", device=device)
        return cpu_fused.chunk_loss_and_grad
    _chose("cross_entropy_chunk", "torch", device=device)
    return reference.chunk_loss_and_grad


# ------------------------------------------------------------------------------------ routed experts

def route_topk(scores: torch.Tensor, bias: torch.Tensor, n_group: int, per_group_top: int, topk_group: int,
               top_k: int) -> torch.Tensor:
    """The router's node-limited top-K selection (`reference.route_topk`), int64 [N, K], best first."""
    if mode() == "auto" and cpu_moe.route_takes(scores, n_group, topk_group, top_k):
        _chose("route_topk", "C", scores)
        return cpu_moe.route_topk(scores, bias, n_group, per_group_top, topk_group, top_k)
    _chose("route_topk", "torch", scores)
    return reference.route_topk(scores, bias, n_group, per_group_top, topk_group, top_k)


def group_by_expert(slot_expert: torch.Tensor, n_experts: int, align: int = 1) -> GroupedLayout:
    """Slots [N, K] (expert ids, -1: elsewhere) laid out as rows grouped by expert (`moe_rows`)."""
    by_kernel = mode() == "auto" and cpu_moe.ids_take(slot_expert.reshape(-1))
    _chose("group_by_expert", "C" if by_kernel else "torch", slot_expert)
    return moe_rows.group_by_expert(slot_expert, n_experts, align, by_kernel)


def dispatch_rows(x: torch.Tensor, layout: GroupedLayout, dtype: torch.dtype) -> torch.Tensor:
    """Token rows x [N, H] -> grouped rows [P, H] in `dtype` (zero rows for padding)."""
    by_kernel = _native(x) and dtype in (torch.bfloat16, torch.float32)
    _chose("dispatch_rows", "C" if by_kernel else "torch", x)
    return moe_rows.dispatch_rows(x, layout, dtype, by_kernel)


def combine_rows(y: torch.Tensor, weights: torch.Tensor, layout: GroupedLayout) -> torch.Tensor:
    """Grouped outputs y [P, H] and slot weights [N, K] -> each token's weighted sum of its K rows, [N, H]."""
    by_kernel = _native(y)
    _chose("combine_rows", "C" if by_kernel else "torch", y)
    return moe_rows.combine_rows(y, weights, layout, by_kernel)


def expert_row_alignment(device: torch.device, dtype: torch.dtype) -> int:
    """Rows per group multiple that the grouped matmul wants: 64 for bf16/fp16 on the CPU (AMX blocks, and
    oneDNN's shape cache for grouped_mm), else 1."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cpu" and low_precision and (
            (mode() == "auto" and amx.ready()) or expert_matmul.grouped_mm_supported(device, dtype)):
        return expert_matmul.CPU_LOW_PRECISION_ALIGN
    return 1


def expert_ffn(x_grouped: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU of every row with its own expert: rows of x_grouped [N, H] grouped by expert in order, counts [E]
    rows each; w1/w3 [E, I, H] (gate/up), w2 [E, H, I]. Computes in x_grouped's dtype. Gate and up run as one
    matmul on their stacked weights. Backends: the AMX kernel (bf16 on an AMX CPU, groups in multiples of 32);
    a batched matmul when all non-empty groups are equal (a collapsed router: a few experts take every token,
    and a bmm over those beats the grouped matmul over all); `torch._grouped_mm` where it runs; else the
    per-expert loop."""
    dt = x_grouped.dtype
    w13, w2 = torch.cat([w1.to(dt), w3.to(dt)], dim=1), w2.to(dt)  # [E, 2I, H]
    if x_grouped.shape[0] == 0:
        return x_grouped.new_zeros(0, w2.shape[1]) + 0 * (w13.sum() + w2.sum())  # keep the graph
    if _linear_precision != "off":  # each expert's GEMMs through the FP8 linear, expert by expert
        _chose("expert_ffn", f"fp8 {_linear_precision}, per expert", x_grouped)
        # the input came through the FP8 dispatch's power-of-2 tiles (`fp8_comm`): quantized on that grid again,
        # the up projection's Fprop takes the dispatched tiles as they are
        gu = reference.grouped_linear_loop(x_grouped, w13, counts, lambda x, w: linear(x, w, pow2_scales=True))
        return reference.grouped_linear_loop(gu, w2, counts, swiglu_linear)
    if mode() == "auto" and amx.grouped_linear_takes(x_grouped, w13, counts):
        _chose("expert_ffn", "AMX", x_grouped)
        h = swiglu(amx.grouped_linear(x_grouped, w13, counts, _weight_grad_sink(x_grouped, w13)))
        return amx.grouped_linear(h, w2, counts, _weight_grad_sink(h, w2))
    used = counts > 0
    sizes = counts[used]
    if bool((sizes == sizes[0]).all()):
        _chose("expert_ffn", "bmm (equal groups)", x_grouped)
        if not bool(used.all()):  # only the experts that have rows
            chosen = used.nonzero().squeeze(1)
            w13, w2 = w13.index_select(0, chosen), w2.index_select(0, chosen)
        xb = x_grouped.view(sizes.numel(), -1, x_grouped.shape[1])
        h = swiglu(expert_matmul.batched_linear(xb, w13, _weight_grad_sink(xb, w13)))
        return expert_matmul.batched_linear(h, w2, _weight_grad_sink(h, w2)).view(x_grouped.shape[0], w2.shape[1])
    if expert_matmul.grouped_mm_supported(x_grouped.device, dt):
        _chose("expert_ffn", "torch._grouped_mm", x_grouped)
        offs = counts.cumsum(0).to(torch.int32)
        h = swiglu(expert_matmul.grouped_linear_mm(x_grouped, w13, offs, _weight_grad_sink(x_grouped, w13)))
        return expert_matmul.grouped_linear_mm(h, w2, offs, _weight_grad_sink(h, w2))
    _chose("expert_ffn", "per-expert loop", x_grouped)
    h = swiglu(expert_matmul.grouped_linear_loop(x_grouped, w13, counts, _weight_grad_sink(x_grouped, w13)))
    return expert_matmul.grouped_linear_loop(h, w2, counts, _weight_grad_sink(h, w2))


# ------------------------------------------------------------------------------------------ attention

def amx_attention_runs(device: torch.device, dtype: torch.dtype, qk_dim: int, v_dim: int) -> bool:
    """Whether "auto" attention can run as the AMX kernel for these head sizes (what `compile_blocks` asks)."""
    return (mode() == "auto" and device.type == "cpu" and dtype == torch.bfloat16 and amx.ready()
            and amx.attention_head_sizes_fit(qk_dim, v_dim))


def choose_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """What `attn_impl = "auto"` runs. On the CPU while one layer's scores ([B, heads, T, T] in the compute dtype)
    fit in 64 MB: "amx" where the AMX kernel takes the call (bf16), else "bmm" (torch's flash-attention backward
    is slow on the CPU at short sequences, bench/RESULTS_train.md); beyond that, and on GPUs, "sdpa"."""
    b, h, t, _ = q.shape
    if q.device.type == "cpu" and b * h * t * t * q.element_size() <= BMM_SCORES_BUDGET:
        return "amx" if mode() == "auto" and amx.attention_takes(q, k, v) else "bmm"
    return "sdpa"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     impl: str = "auto") -> torch.Tensor:
    """softmax(scale q k^T + causal mask) v for q, k [B, H, T, D], v [B, H, T, Dv] -> [B, H, T, Dv]; `impl` is
    `model.attn_impl` ("auto", "amx", "sdpa", "bmm", "eager")."""
    impl = choose_attention(q, k, v) if impl == "auto" else impl
    _chose("causal_attention", "AMX" if impl == "amx" else impl, q)
    if impl == "amx":
        return amx.causal_attention(q, k, v, scale)
    if impl == "sdpa":
        return attention.sdpa_causal(q, k, v, scale)
    if impl == "bmm":
        return attention.bmm_causal(q, k, v, scale)
    return reference.eager_causal_attention(q, k, v, scale)


def attention_output(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, impl: str,
                     weight: torch.Tensor) -> torch.Tensor:
    """The attention core and its output projection: q, k [B, heads, T, D], v [B, heads, T, Dv], weight (o_proj)
    [out, heads · Dv] -> [B, T, out]. Under FP8 one op that keeps the core's output once, in E5M6, for both
    backward passes that read it, as the report does (`fp8_attention`; flash attention whatever `impl` says);
    otherwise `causal_attention` then `linear`."""
    if _linear_precision == "off":
        b, heads, t, dv = v.shape
        return linear(causal_attention(q, k, v, scale, impl).transpose(1, 2).reshape(b, t, heads * dv), weight)
    from sourcelm.kernels import fp8_attention

    _chose("attention_output", f"fp8 {_linear_precision}, flash attention, its output kept in E5M6", q)
    return fp8_attention.fp8_attention_output(q, k, v, scale, weight, _linear_precision, _weight_grad_sink(q, weight))


# ------------------------------------------------------------------------------------- linear layers

_linear_precision = "off"  # `train.fp8` while the trainer's forward runs ("off", "emulate", "cuda")


@contextlib.contextmanager
def linear_precision(fp8: str):
    """Runs the projections (`linear`) inside the block in FP8 (`train.fp8`: "emulate" or "cuda") or not ("off");
    backward follows what each forward chose, wherever it runs."""
    global _linear_precision
    previous, _linear_precision = _linear_precision, fp8
    try:
        yield
    finally:
        _linear_precision = previous


def linear(x: torch.Tensor, weight: torch.Tensor, pow2_scales: bool = False) -> torch.Tensor:
    """x W^T for every projection of the model that is a plain matmul (attention's, the dense and shared FFNs', and
    the routed experts' through `expert_ffn`): the one place where their precision is chosen. Stacked weights (q_a
    with kv_a, gate with up) are quantized as one matrix, so a 128x128 block may straddle the two where a width is
    not a multiple of 128 (the tiny preset; not DeepSeek-V3, whose widths are). Inside `deferring_weight_grads`
    backward leaves the weight gradient for later (`_DeferredLinear`). pow2_scales: under FP8, x's tiles take
    power-of-2 scales (`fp8.fp8_linear`)."""
    sink = _weight_grad_sink(x, weight)
    if _linear_precision != "off":
        from sourcelm.kernels import fp8

        _chose("linear", f"fp8 {_linear_precision}", x)
        return fp8.fp8_linear(x, weight, _linear_precision, sink, pow2_scales)
    if sink is None:
        return F.linear(x, weight)
    # the casts autocast would apply inside F.linear, made here so they stay in the weight's own graph (the part
    # the deferred gradient runs through later) and the GEMMs below see the dtypes F.linear would
    x, sink.weight = _autocast_operands(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        return _DeferredLinear.apply(x, sink.weight.detach(), sink)


def fp8_dispatch() -> bool:
    """Whether the routed experts' tokens travel in FP8 (under `train.fp8`, as the report's recipe does)."""
    return _linear_precision != "off"


def routed_experts_input(x: torch.Tensor) -> torch.Tensor:
    """The routed experts' input as the dispatch delivers it: under FP8 rounded through the dispatch's E4M3 tiles
    (`fp8_comm.round_input`), on every layout; else x."""
    if _linear_precision == "off":
        return x
    from sourcelm.kernels import fp8_comm

    return fp8_comm.round_input(x)


def routed_experts_output(y: torch.Tensor) -> torch.Tensor:
    """The routed experts' combined output; under FP8 its gradient is rounded as the FP8 combine-backward delivers
    it (`fp8_comm.round_output_grad`), on every layout."""
    if _linear_precision == "off":
        return y
    from sourcelm.kernels import fp8_comm

    return fp8_comm.round_output_grad(y)


def swiglu_linear(gu: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear(swiglu(gu), weight): an FFN's down projection on its SwiGLU (gu = [gate | up]). Under FP8 one op
    that keeps the SwiGLU's input for backward as E4M3 tiles and recomputes its output there, as the report does
    (`fp8.fp8_swiglu_linear`); otherwise the two ops."""
    if _linear_precision == "off":
        return linear(swiglu(gu), weight)
    from sourcelm.kernels import fp8

    _chose("swiglu_linear", f"fp8 {_linear_precision}", gu)
    return fp8.fp8_swiglu_linear(gu, weight, swiglu, _linear_precision, _weight_grad_sink(gu, weight))


# ------------------------------------------------------------------------ deferred weight gradients

_deferral = threading.local()  # .bucket: where this thread's forward files its GEMMs' weight gradients


@contextlib.contextmanager
def deferring_weight_grads(bucket: list):
    """The forward run inside (in this thread) builds its weight-carrying GEMMs (`linear`, `expert_ffn` on every
    backend) so that their backward computes the input gradient only and appends (weight, compute) to `bucket`:
    `torch.autograd.backward(weight, compute())` later gives the weight (and through its own graph, casts and
    concatenations, the parameters) the gradient backward would have given it (`sourcelm.train.weight_grad`, the
    zero-bubble W split). Decided at forward, not at backward: on a GPU the autograd engine runs backward in its own
    device threads, where a flag of the caller's thread is not seen."""
    previous = getattr(_deferral, "bucket", None)
    _deferral.bucket = bucket
    try:
        yield
    finally:
        _deferral.bucket = previous


class WeightGradSink:
    """Where one GEMM's backward files its weight gradient: `weight` is the GEMM's weight with its graph (the GEMM
    itself gets it detached, so backward does not reach it), `file(compute)` queues compute() -> its gradient."""

    def __init__(self, bucket: list, weight: torch.Tensor):
        self.bucket, self.weight = bucket, weight

    def file(self, compute) -> None:
        self.bucket.append((self.weight, compute))


def _weight_grad_sink(x: torch.Tensor, weight: torch.Tensor) -> WeightGradSink | None:
    """A sink when this thread defers and the GEMM has both gradients to give (with x not requiring one, the
    output would not either once the weight is detached)."""
    bucket = getattr(_deferral, "bucket", None)
    if bucket is None or not (x.requires_grad and weight.requires_grad and torch.is_grad_enabled()):
        return None
    return WeightGradSink(bucket, weight)


def _autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands as autocast casts them for a lower-precision op: floating point, not fp64, to its dtype."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dt = torch.get_autocast_dtype(device)
    return tuple(t.to(dt) if t.is_floating_point() and t.dtype not in (dt, torch.float64) else t for t in tensors)


class _DeferredLinear(torch.autograd.Function):
    """F.linear(x, weight) whose backward returns x's gradient and files the weight's. Both are the GEMMs autograd
    runs for F.linear (matmul folds x to [N, in]; mm's backward for a row-major weight: dx = g W, dW = g^T x), so
    the bits are the same."""

    @staticmethod
    def forward(ctx, x, weight, sink):
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        ctx.sink.file(lambda: g.t().mm(x.reshape(-1, x.shape[-1])))
        return g.mm(weight).reshape(x.shape), None, None


# ------------------------------------------------------------------------------------------ optimizer

def adamw_backend(device: torch.device) -> str:
    """"C" (`cpu_adamw`: blockwise AdamW on the CPU, with bf16 compute copies) or "torch" (torch's fused AdamW)."""
    backend = "C" if native_runs(device) else "torch"
    _chose("adamw", backend, device=device)
    return backend
