"""Routed-expert compute on rows grouped by expert: the layout, the gather into it, the grouped SwiGLU,
and the weighted gather back out. Used by the single-device MoE and, on the rows a rank received,
by the expert-parallel layer.

Each token n has K slots; slot (n, k) names an expert (or -1: computed elsewhere, under expert
parallelism). `group_by_expert` lays the slots out as rows grouped by expert, in (token, slot)
order inside an expert, each group padded to a multiple of `align` rows; it returns two index maps,
row -> slot and slot -> row, with one sentinel (a zero row, appended to the gathered tensor only when
some row or slot points at it) for padding and absent slots. Both
directions of both data movements are then plain gathers (`index_select`): dispatch forward gathers
token rows, its backward gathers the K slot gradients of each token and sums them in fp32 in slot
order; combine forward gathers each token's K outputs and weights them, its backward gathers the
weighted output gradient per row. No scatter-add anywhere: deterministic on every device, and on CPU
measured faster than the autograd of `x[order // K]` (an accumulating index_put). On the CPU the four
run as native kernels (`native.gather_rows`, `sum_rows`, `slot_dots`): each gather fused with its cast,
weighting or slot sum, one pass instead of a gathered [N*K, H] temporary and two or three passes over it;
the layout itself is a counting sort there (`native.expert_counts`, `slot_layout`), the same maps.

`expert_ffn` runs, for bf16 on a CPU with AMX, one native grouped matmul per projection and direction
(`amx.grouped_linear`, which needs groups in multiples of 32 rows: the layout pads them to 64); else
one batched matmul (`bmm`) per projection when all non-empty groups have the same size
(over the experts that have rows only, their weights gathered, when some have none), else
one `torch._grouped_mm` per projection where this torch build supports it for the device and dtype,
else a loop over the non-empty experts on slices of the grouped rows. Measured on 2 CPU cores (16
experts, 8192 rows, H 256, I 128, uneven groups, forward + backward of one projection): grouped_mm
8 ms (fp32) / 4 ms (bf16), the slice loop 15 / 8 ms. Equal groups come from a collapsed router (the tiny
preset's from about step 20: four experts take every token), where a bmm over those four beats the
grouped matmul over all sixteen: 2.8 against 3.3 ms forward + backward per projection.
Padding every group to the largest so that a bmm always applies was measured and dropped: with the
balanced routing of the first steps it is no faster (the tiny preset's trainer, steps 3-10: 13.8k tok/s
either way), and as the router drifts from balance (the largest group 1.3-2.2x the mean by step 10) the
padded rows cost more than the grouped matmul's per-group calls (steps 10-30: 147 against 155 ms a step).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sourcelm.model import amx, native

log = logging.getLogger(__name__)

_GROUPED_MM_OK: dict[tuple[str, torch.dtype], bool] = {}
# On CPU a bf16/fp16 grouped matmul runs one oneDNN matmul per group, and oneDNN JIT-compiles a kernel
# for every new row count. With routing nearly every group of every step is a new shape: measured
# (16 groups, 8192 rows, one projection forward) 11.7 ms, and 1.3 ms once groups are padded to
# multiples of 64 rows, whose few shapes the primitive cache keeps. fp32 does not JIT and is not padded.
CPU_LOW_PRECISION_ALIGN = 64


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch._grouped_mm` runs forward and backward here, checked once per (device type, dtype)
    on a small problem against the plain loop; the choice is logged."""
    key = (device.type, dtype)
    if key not in _GROUPED_MM_OK:
        ok = False
        if hasattr(torch, "_grouped_mm"):
            try:
                g = torch.Generator().manual_seed(0)
                # uneven and empty groups, as real routing produces (some kernels need aligned groups)
                x = torch.randn(32, 16, generator=g).to(device, dtype).requires_grad_()
                w = torch.randn(3, 16, 16, generator=g).to(device, dtype).requires_grad_()
                offs = torch.tensor([5, 5, 32], dtype=torch.int32, device=device)
                y = torch._grouped_mm(x, w, offs=offs)
                ref = torch.cat([x[:5] @ w[0], x[5:] @ w[2]])
                y.backward(torch.ones_like(y))
                ok = bool(torch.allclose(y.float(), ref.float(), rtol=2e-2, atol=2e-2)) and w.grad is not None
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM_OK[key] = ok
        log.info("routed experts on %s/%s: %s", device.type, dtype,
                 "torch._grouped_mm" if ok else "loop over non-empty experts (grouped_mm unsupported here)")
    return _GROUPED_MM_OK[key]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's when it is on (_grouped_mm is not on its cast list)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def row_alignment(device: torch.device, dtype: torch.dtype) -> int:
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cpu" and low_precision and (amx.ready() or grouped_mm_supported(device, dtype)):
        return CPU_LOW_PRECISION_ALIGN
    return 1


# ------------------------------------------------------------------------------------------- layout

@dataclass
class GroupedLayout:
    counts: torch.Tensor       # [E] rows per expert group, padding included
    copy_of_row: torch.Tensor  # [P] the slot n*K + k each grouped row holds; N*K for a padding row
    row_of_slot: torch.Tensor  # [N*K] the grouped row of each slot; P for a slot computed elsewhere
    n_tokens: int
    k: int
    complete: bool  # every slot is here (no expert parallelism): slot -> row needs no sentinel


def group_by_expert(slot_expert: torch.Tensor, n_experts: int, align: int = 1) -> GroupedLayout:
    """slot_expert [N, K] int64 expert ids (-1: not here) -> the grouped layout (see the module docstring)."""
    n, k = slot_expert.shape
    flat = slot_expert.reshape(-1)
    by_kernel = native.ids_take(flat)  # the CPU: a counting sort in C, the same maps
    if by_kernel:
        counts = native.expert_counts(flat, n_experts)
    else:
        here = flat >= 0
        # slots grouped by expert, (token, slot) order inside a group; absent slots sort last and are cut
        order = torch.where(here, flat, n_experts).argsort(stable=True)[: int(here.sum())]
        counts = torch.bincount(flat[here], minlength=n_experts)
    padded = (counts + align - 1) // align * align if align > 1 else counts
    p = int(padded.sum())
    if by_kernel:
        copy_of_row, row_of_slot = native.slot_layout(flat, padded, p)
    else:
        shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)  # padding inserted before each group
        rows = torch.arange(order.numel(), device=flat.device) + torch.repeat_interleave(shift, counts,
                                                                                         output_size=order.numel())
        copy_of_row = torch.full((p,), n * k, dtype=torch.long, device=flat.device).index_copy_(0, rows, order)
        row_of_slot = torch.full((n * k,), p, dtype=torch.long, device=flat.device).index_copy_(0, order, rows)
    return GroupedLayout(padded, copy_of_row, row_of_slot, n, k, int(counts.sum()) == n * k)


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(1, t.shape[1])])


def _rows_of_slots(t: torch.Tensor, layout: GroupedLayout) -> torch.Tensor:
    """Grouped rows t [P, H] -> the row of each slot, [N, K, H]; zeros for slots computed elsewhere (the
    sentinel row, appended only when there are such slots: a copy of t saved otherwise)."""
    src = t if layout.complete else _with_zero_row(t)
    return src.index_select(0, layout.row_of_slot).view(layout.n_tokens, layout.k, t.shape[1])


class _Dispatch(torch.autograd.Function):
    """x [N, H] -> grouped rows [P, H] in `dtype` (zero rows for padding)."""

    @staticmethod
    def forward(ctx, x, layout: GroupedLayout, dtype):
        ctx.layout, ctx.x_dtype = layout, x.dtype
        if native.takes(x) and dtype in (torch.bfloat16, torch.float32):  # the cast and the gather in one pass
            return native.gather_rows(x.contiguous(), layout.copy_of_row, layout.k, None, dtype)
        rows = x.new_empty(x.shape[0] + 1, x.shape[1], dtype=dtype)  # the tokens, cast, then the zero row
        rows[:-1].copy_(x)
        rows[-1].zero_()
        return rows.index_select(0, layout.copy_of_row // layout.k)

    @staticmethod
    def backward(ctx, grad):
        lay = ctx.layout
        if native.takes(grad):  # each token's K slot gradients summed in fp32, in slot order, as below
            return native.sum_rows(grad.contiguous(), lay.row_of_slot, lay.k, None, ctx.x_dtype), None, None
        per_slot = _rows_of_slots(grad, lay)
        acc = torch.promote_types(per_slot.dtype, torch.float32)  # bf16 slot gradients summed in fp32
        return per_slot.sum(1, dtype=acc).to(ctx.x_dtype), None, None


class _Combine(torch.autograd.Function):
    """Grouped outputs y [P, H] and slot weights w [N, K] -> sum_k w[n, k] y[row of (n, k)]: [N, H].
    The torch code weights in y's dtype; the native kernels (CPU) in fp32, rounding once."""

    @staticmethod
    def forward(ctx, y, weights, layout: GroupedLayout):
        ctx.layout = layout
        ctx.save_for_backward(y, weights)
        if native.takes(y):
            w = weights.reshape(-1).to(torch.float32).contiguous()
            return native.sum_rows(y.contiguous(), layout.row_of_slot, layout.k, w, y.dtype)
        return torch.bmm(weights.to(y.dtype).unsqueeze(1), _rows_of_slots(y, layout)).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        y, weights = ctx.saved_tensors
        lay = ctx.layout
        grad = grad.to(y.dtype)
        if native.takes(y):
            y, grad = y.contiguous(), grad.contiguous()
            grad_w = native.slot_dots(y, lay.row_of_slot, grad, lay.k).view_as(weights).to(weights.dtype)
            w = weights.reshape(-1).to(torch.float32).contiguous()
            return native.gather_rows(grad, lay.copy_of_row, lay.k, w, y.dtype), grad_w, None
        grad_w = torch.bmm(_rows_of_slots(y, lay), grad.unsqueeze(-1)).squeeze(-1).to(weights.dtype)
        weighted = (grad.unsqueeze(1) * weights.to(y.dtype).unsqueeze(-1)).view(lay.n_tokens * lay.k, y.shape[1])
        grad_y = _with_zero_row(weighted).index_select(0, lay.copy_of_row)
        return grad_y, grad_w, None


def dispatch_rows(x: torch.Tensor, layout: GroupedLayout, dtype: torch.dtype) -> torch.Tensor:
    return _Dispatch.apply(x, layout, dtype)


def combine_rows(y: torch.Tensor, weights: torch.Tensor, layout: GroupedLayout) -> torch.Tensor:
    return _Combine.apply(y, weights, layout)


# ---------------------------------------------------------------------------------- grouped SwiGLU

class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (the grouped-matmul backward
    rejects expanded gradients such as the one `y.sum().backward()` produces)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
    """Rows of x [N, in] grouped by expert (counts [E]) times w[e]^T ([E, out, in]) -> [N, out]."""
    if offs is not None:
        return torch._grouped_mm(_ContiguousGrad.apply(x), w.transpose(-2, -1), offs=offs)
    out = []
    for e, (rows, n) in enumerate(zip(x.split(counts.tolist()), counts.tolist())):
        if n:
            out.append(rows @ w[e].t())
    return torch.cat(out) if out else x.new_zeros(0, w.shape[1])


def swiglu_torch(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gu = [gate | up] along the last dimension."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """The activation of every FFN here, whose gate and up projections run as one matmul (one input
    gradient, not two to sum). On the CPU one native kernel each way (`native.swiglu`: forward + backward
    1.1 against 2.1 ms for a bf16 routed-expert layer of the tiny preset, 1.3 against 2.6 ms for its dense
    FFN, `bench/native_kernels.py`); elsewhere, and under torch.compile, `swiglu_torch`."""
    return native.swiglu(gu) if native.swiglu_takes(gu) else swiglu_torch(gu)


def expert_ffn(x_grouped: torch.Tensor, counts: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
               w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU of every row with its own expert: rows of x_grouped [N, H] are grouped by expert in order,
    counts [E] (int) rows each (sum(counts) == N); w1/w3 [E, I, H], w2 [E, H, I]. Computes in
    x_grouped's dtype (the weights are cast to it). Returns [N, H]."""
    dt = x_grouped.dtype
    w13, w2 = torch.cat([w1.to(dt), w3.to(dt)], dim=1), w2.to(dt)  # [E, 2I, H]: gate and up in one matmul
    if x_grouped.shape[0] == 0:
        return x_grouped.new_zeros(0, w2.shape[1]) + 0 * (w13.sum() + w2.sum())  # keep the graph
    if amx.grouped_linear_takes(x_grouped, w13, counts):  # the CPU with AMX: one kernel call per matmul
        return amx.grouped_linear(swiglu(amx.grouped_linear(x_grouped, w13, counts)), w2, counts)
    used = counts > 0
    sizes = counts[used]
    if bool((sizes == sizes[0]).all()):  # equal groups (empty ones aside): one batched matmul per projection
        if not bool(used.all()):  # only the experts that have rows (a collapsed router: a few take every token)
            chosen = used.nonzero().squeeze(1)
            w13, w2 = w13.index_select(0, chosen), w2.index_select(0, chosen)
        xb = x_grouped.view(sizes.numel(), -1, x_grouped.shape[1])
        h = swiglu(torch.bmm(xb, w13.transpose(-2, -1)))
        return torch.bmm(h, w2.transpose(-2, -1)).view(x_grouped.shape[0], w2.shape[1])
    offs = counts.cumsum(0).to(torch.int32) if grouped_mm_supported(x_grouped.device, dt) else None
    return _grouped_linear(swiglu(_grouped_linear(x_grouped, w13, counts, offs)), w2, counts, offs)


def grouped_experts_forward(x: torch.Tensor, slot_expert: torch.Tensor, slot_weights: torch.Tensor,
                            w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """x [N, H], slot_expert [N, K] (ids into the experts of w1/w2/w3; -1: not here), slot_weights [N, K]
    -> sum over the slots here of weight * expert(x) [N, H], in the compute dtype."""
    dtype = compute_dtype(x)
    layout = group_by_expert(slot_expert, w1.shape[0], row_alignment(x.device, dtype))
    y = expert_ffn(dispatch_rows(x, layout, dtype), layout.counts, w1, w2, w3)
    return combine_rows(y, slot_weights, layout)
