"""The routed experts' CPU kernels: the router's group-limited top-k selection, the counting sort that lays
slots out by expert, and the row movements of dispatch and combine (each gather fused with its cast,
weighting or slot sum). Their torch twins: `sourcelm.kernels.reference` and `sourcelm.kernels.moe_rows`.
"""

from __future__ import annotations

import torch

from sourcelm.kernels.build import available, checked, library, takes, variant

# ------------------------------------------------------------------------------- routed-expert rows

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
    checked(src)
    _check_index(index)
    if weights is not None and weights.numel() < src.shape[0] * div:
        raise ValueError("gather_rows needs a weight for every slot of src")
    out = torch.empty(index.numel(), src.shape[1], dtype=dtype)
    variant("gather_rows", src.dtype, dtype)(src.data_ptr(), src.shape[0], index.data_ptr(), div, _weights(weights),
                                              index.numel(), src.shape[1], out.data_ptr())
    return out


def sum_rows(src: torch.Tensor, index: torch.Tensor, k: int, weights: torch.Tensor | None,
             dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum over j < k of weights[t*k + j] * src[index[t*k + j]] (zero terms for indices outside
    src), in fp32 and slot order; src [rows, dim], index int64 [T*k], weights fp32 [T*k] or None ->
    [T, dim] in `dtype`."""
    checked(src)
    _check_index(index)
    if index.numel() % k or (weights is not None and weights.numel() != index.numel()):
        raise ValueError("sum_rows needs k slots per token and one weight per slot")
    out = torch.empty(index.numel() // k, src.shape[1], dtype=dtype)
    variant("sum_rows", src.dtype, dtype)(src.data_ptr(), src.shape[0], index.data_ptr(), _weights(weights),
                                           out.shape[0], k, src.shape[1], out.data_ptr())
    return out


def slot_dots(src: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """out[s] = <src[index[s]], grad[s // k]> (0 where index[s] is outside src), fp32 [S]; src [rows, dim]
    and grad [S / k, dim] of one dtype."""
    checked(src, grad)
    _check_index(index)
    if grad.shape != (index.numel() // k, src.shape[1]) or index.numel() % k:
        raise ValueError("slot_dots needs grad [slots / k, dim] for src [rows, dim]")
    out = torch.empty(index.numel(), dtype=torch.float32)
    variant("slot_dots", src.dtype)(src.data_ptr(), src.shape[0], index.data_ptr(), grad.data_ptr(), index.numel(),
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
    library().route_topk(scores.data_ptr(), bias.data_ptr(), scores.shape[0], scores.shape[1], n_group,
                          per_group_top, topk_group, top_k, out.data_ptr())
    return out


def ids_take(ids: torch.Tensor) -> bool:
    """Whether `expert_counts` and `slot_layout` take these expert ids: contiguous int64 on the CPU."""
    return (ids.device.type == "cpu" and ids.dtype == torch.int64 and ids.is_contiguous()
            and not torch.compiler.is_compiling() and available())


def expert_counts(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Slots per expert, int64 [n_experts], of ids [S] (ids < 0: not here; an id >= n_experts is an error)."""
    counts = torch.empty(n_experts, dtype=torch.int64)
    bad = library().count_experts(ids.data_ptr(), ids.numel(), n_experts, counts.data_ptr())
    if bad:
        raise ValueError(f"{bad} expert ids >= {n_experts}")
    return counts


def slot_layout(ids: torch.Tensor, padded: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_rows.group_by_expert`'s index maps: groups in expert order, each padded[e] rows long
    (sum = rows), slots in (token, slot) order inside a group -> (copy_of_row [rows], row_of_slot [S])."""
    padded = padded.to(torch.int64).contiguous()
    copy_of_row = torch.empty(rows, dtype=torch.int64)
    row_of_slot = torch.empty(ids.numel(), dtype=torch.int64)
    scratch = torch.empty(2 * padded.numel(), dtype=torch.int64)
    bad = library().lay_out_slots(ids.data_ptr(), ids.numel(), padded.numel(), padded.data_ptr(), rows,
                                   scratch.data_ptr(), copy_of_row.data_ptr(), row_of_slot.data_ptr())
    if bad:
        raise ValueError(f"{bad} slots with an expert id >= {padded.numel()} or beyond their group's padded size")
    return copy_of_row, row_of_slot

