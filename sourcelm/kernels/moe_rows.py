"""The routed experts' row movements: the layout that groups token slots by expert, the gather into it
(dispatch) and the weighted gather back out (combine), each direction of each as an autograd function.

Each token n has K slots; slot (n, k) names an expert (or -1: computed elsewhere, under expert
parallelism). `group_by_expert` lays the slots out as rows grouped by expert, in (token, slot) order
inside an expert, each group padded to a multiple of `align` rows; it returns two index maps, row -> slot
and slot -> row, with one sentinel (a zero row, appended to the gathered tensor only when some row or
slot points at it) for padding and absent slots. Both directions of both data movements are then plain
gathers (`index_select`): dispatch forward gathers token rows, its backward gathers the K slot gradients
of each token and sums them in fp32 in slot order; combine forward gathers each token's K outputs and
weights them, its backward gathers the weighted output gradient per row. No scatter-add anywhere:
deterministic on every device, and on CPU faster than the autograd of `x[order // K]` (an accumulating
index_put). `by_kernel` (chosen by `ops.py`): the four run as C kernels (`cpu_moe.gather_rows`,
`sum_rows`, `slot_dots`), each gather fused with its cast, weighting or slot sum, and the layout as a
counting sort; the same maps and sums.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sourcelm.kernels import cpu_moe


@dataclass
class GroupedLayout:
    counts: torch.Tensor       # [E] rows per expert group, padding included
    copy_of_row: torch.Tensor  # [P] the slot n*K + k each grouped row holds; N*K for a padding row
    row_of_slot: torch.Tensor  # [N*K] the grouped row of each slot; P for a slot computed elsewhere
    n_tokens: int
    k: int
    complete: bool  # every slot is here (no expert parallelism): slot -> row needs no sentinel


def group_by_expert(slot_expert: torch.Tensor, n_experts: int, align: int, by_kernel: bool) -> GroupedLayout:
    """slot_expert [N, K] int64 expert ids (-1: not here) -> the grouped layout (see the module docstring);
    `by_kernel`: a counting sort in C (`cpu_moe`), else torch's stable argsort, the same maps."""
    n, k = slot_expert.shape
    flat = slot_expert.reshape(-1)
    if by_kernel:
        counts = cpu_moe.expert_counts(flat, n_experts)
    else:
        here = flat >= 0
        # slots grouped by expert, (token, slot) order inside a group; absent slots sort last and are cut
        order = torch.where(here, flat, n_experts).argsort(stable=True)[: int(here.sum())]
        counts = torch.bincount(flat[here], minlength=n_experts)
    padded = (counts + align - 1) // align * align if align > 1 else counts
    p = int(padded.sum())
    if by_kernel:
        copy_of_row, row_of_slot = cpu_moe.slot_layout(flat, padded, p)
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
    def forward(ctx, x, layout: GroupedLayout, dtype, by_kernel: bool):
        ctx.layout, ctx.x_dtype, ctx.by_kernel = layout, x.dtype, by_kernel
        if by_kernel:  # the cast and the gather in one pass
            return cpu_moe.gather_rows(x.contiguous(), layout.copy_of_row, layout.k, None, dtype)
        rows = x.new_empty(x.shape[0] + 1, x.shape[1], dtype=dtype)  # the tokens, cast, then the zero row
        rows[:-1].copy_(x)
        rows[-1].zero_()
        return rows.index_select(0, layout.copy_of_row // layout.k)

    @staticmethod
    def backward(ctx, grad):
        lay = ctx.layout
        if ctx.by_kernel:  # each token's K slot gradients summed in fp32, in slot order, as below
            return cpu_moe.sum_rows(grad.contiguous(), lay.row_of_slot, lay.k, None, ctx.x_dtype), None, None, None
        per_slot = _rows_of_slots(grad, lay)
        acc = torch.promote_types(per_slot.dtype, torch.float32)  # bf16 slot gradients summed in fp32
        return per_slot.sum(1, dtype=acc).to(ctx.x_dtype), None, None, None


class _Combine(torch.autograd.Function):
    """Grouped outputs y [P, H] and slot weights w [N, K] -> sum_k w[n, k] y[row of (n, k)]: [N, H].
    The torch code weights in y's dtype; the native kernels (CPU) in fp32, rounding once."""

    @staticmethod
    def forward(ctx, y, weights, layout: GroupedLayout, by_kernel: bool):
        ctx.layout, ctx.by_kernel = layout, by_kernel
        ctx.save_for_backward(y, weights)
        if by_kernel:
            w = weights.reshape(-1).to(torch.float32).contiguous()
            return cpu_moe.sum_rows(y.contiguous(), layout.row_of_slot, layout.k, w, y.dtype)
        return torch.bmm(weights.to(y.dtype).unsqueeze(1), _rows_of_slots(y, layout)).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        y, weights = ctx.saved_tensors
        lay = ctx.layout
        grad = grad.to(y.dtype)
        if ctx.by_kernel:
            y, grad = y.contiguous(), grad.contiguous()
            grad_w = cpu_moe.slot_dots(y, lay.row_of_slot, grad, lay.k).view_as(weights).to(weights.dtype)
            w = weights.reshape(-1).to(torch.float32).contiguous()
            return cpu_moe.gather_rows(grad, lay.copy_of_row, lay.k, w, y.dtype), grad_w, None, None
        grad_w = torch.bmm(_rows_of_slots(y, lay), grad.unsqueeze(-1)).squeeze(-1).to(weights.dtype)
        weighted = (grad.unsqueeze(1) * weights.to(y.dtype).unsqueeze(-1)).view(lay.n_tokens * lay.k, y.shape[1])
        grad_y = _with_zero_row(weighted).index_select(0, lay.copy_of_row)
        return grad_y, grad_w, None, None


def dispatch_rows(x: torch.Tensor, layout: GroupedLayout, dtype: torch.dtype, by_kernel: bool) -> torch.Tensor:
    return _Dispatch.apply(x, layout, dtype, by_kernel)


def combine_rows(y: torch.Tensor, weights: torch.Tensor, layout: GroupedLayout, by_kernel: bool) -> torch.Tensor:
    return _Combine.apply(y, weights, layout, by_kernel)


