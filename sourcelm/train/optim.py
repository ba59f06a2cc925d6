"""AdamW over a flat buffer, shardable over data-parallel ranks (ZeRO-1).

The report trains with AdamW(β1 0.9, β2 0.95, weight decay 0.1) and shards optimizer state over
data-parallel ranks (ZeRO-1). One implementation serves both cases: the parameters of a group live
in one persistent flat fp32 buffer (each parameter's `.data` is a view of it). A rank owns the
contiguous slice [lo, hi) (the whole buffer without sharding), keeps Adam moments for that slice only,
updates it in place with a fused AdamW kernel (`sourcelm/kernels/csrc/adamw.c` on the CPU, torch's elsewhere), and the
updated slices are all-gathered back into the buffer. The update is elementwise, but torch's kernel rounds
an element differently in its vector body and its scalar tail (1 ulp), so the buffer is updated in fixed
blocks (and the CPU kernel keeps to 64-element chunks inside them): cut at multiples of
`BLOCK` elements, at the decay boundary and at parameter boundaries, the same cuts whatever the
sharding (slices are whole blocks). A sharded run thus produces the same bits as an unsharded one.

Gradients: `zero_grad` drops every `.grad`, so backward hands each parameter its gradient as a fresh
tensor, and the update reads the blocks straight out of those (a block never spans two parameters).
Several micro-batches, or a layout that reduces gradients over ranks (one collective), first fold them
into an fp32 flat buffer (`fold_grads`), which the blocks then read. Accumulating into a zeroed flat
buffer every time would cost a zeroing pass and a read-add-write pass over all gradients every step.
Nothing is concatenated or copied back per step (the figures: bench/RESULTS_train.md).

Compute copies (`copies`, on the CPU where the native kernels run): the weights that only enter matmuls
(`DeepseekV3.matmul_weights`) also live as bf16 parameters in a flat buffer of their own, which the
update writes as it writes the fp32 masters (`cpu_adamw.AdamWBlocks`, which also reads bf16 gradients). The
trainer runs forward and backward on those (`ComputeCopies`): autocast then has no weight to cast
forward and backward no gradient to cast back to fp32, two passes over every matmul weight a step. The
values are the ones autocast's casts produced, so training gives the same bits with or without them;
gradients of several micro-batches are summed in fp32 (`fold_grads`), as before.

Moments in bf16 (`state_dtype=torch.bfloat16`, as the report keeps them, §3.3): half the optimizer memory. Each
element's update runs in fp32 exactly as with fp32 moments, the moments are rounded to bf16 (nearest even) as they
are stored. The native kernel reads and writes them directly; torch's fused kernel takes one dtype for all its
tensors, so elsewhere a block's moments are widened to fp32, updated, and rounded back (the same arithmetic, one
extra pass over the moments). Checkpoints keep them in bf16, so a resumed run continues bit for bit.

Weight decay: applied to matrices (linear weights, embeddings, the head, experts) and not to
vectors (RMSNorm gains) nor to the router's expert-bias, which is a buffer outside the optimizer.
This is the usual convention (decay shrinks weights that multiply activations; decaying a norm gain
towards zero would fight the normalisation); the report does not publish its exclusion list.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.distributed as dist
from torch import nn

from sourcelm.kernels import cpu_adamw, ops


def decays(name: str, param: nn.Parameter) -> bool:
    return param.ndim >= 2


BLOCK = 1 << 16  # elements per fused-kernel block, and the granularity of a rank's slice
STATE_DTYPES = (torch.float32, torch.bfloat16)  # the AdamW moments' storage


class FlatAdamW:
    def __init__(self, named_params: list[tuple[str, nn.Parameter]], betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=0.1, group: dist.ProcessGroup | None = None, copies: Collection[str] = (),
                 state_dtype: torch.dtype = torch.float32):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"FlatAdamW state_dtype = {state_dtype}: keep the moments in torch.float32 or "
                             "torch.bfloat16")
        self.state_dtype = state_dtype
        for n, p in named_params:
            if p.dtype != torch.float32:
                raise ValueError(f"FlatAdamW keeps fp32 master weights; parameter {n} is {p.dtype}: keep the model "
                                 f"in fp32 and use train.dtype for the compute dtype")
        self.device = named_params[0][1].device if named_params else torch.device("cpu")
        # the native kernel updates the buffer on the CPU (and writes compute copies); torch's fused AdamW elsewhere
        self.native = ops.adamw_backend(self.device) == "C"
        copied = {n for n, _ in named_params if n in set(copies)} if self.native else set()
        # copied matrices, other matrices, then vectors: two boundary indices instead of per-element masks
        ordered = ([np for np in named_params if np[0] in copied] +
                   [np for np in named_params if decays(*np) and np[0] not in copied] +
                   [np for np in named_params if not decays(*np)])
        if not copied <= {n for n, p in ordered if decays(n, p)}:
            raise ValueError(f"compute copies are for matrices; {sorted(copied)[:3]} includes a vector")
        self.names = [n for n, _ in ordered]
        self.params = [p for _, p in ordered]
        for n, p in ordered:
            if p.device != self.device:
                raise ValueError(f"FlatAdamW keeps its parameters on one device; {n} is on {p.device}, "
                                 f"not {self.device}")
        self.copy_end = sum(p.numel() for n, p in ordered if n in copied)
        self.decay_end = sum(p.numel() for n, p in ordered if decays(n, p))
        self.numel = sum(p.numel() for p in self.params)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        # whole blocks per rank, padded so every rank's slice has the same size
        self.shard = -(-self.numel // (self.world * BLOCK)) * BLOCK
        self.lo, self.hi = rank * self.shard, min((rank + 1) * self.shard, self.numel)
        # the persistent flat buffers; the parameter buffer is padded to world × shard for the all-gather
        self.flat_param = torch.zeros(self.shard * self.world, dtype=torch.float32, device=self.device)
        self.flat_grad = None  # allocated by the first `fold_grads`
        self._folded = False  # whether this step's gradients are in flat_grad (else where backward left them)
        self._offsets, offset = [], 0
        for p in self.params:
            k = p.numel()
            self.flat_param[offset:offset + k].copy_(p.data.reshape(-1))
            p.data = self.flat_param[offset:offset + k].view_as(p)
            self._offsets.append(offset)
            offset += k
        # the bf16 compute copies: parameters of their own (backward leaves their gradients there), views of one buffer
        self.flat_copy = torch.empty(self.copy_end, dtype=torch.bfloat16, device=self.device)
        self.copies = {n: nn.Parameter(self.flat_copy[o:o + p.numel()].view_as(p))
                       for n, p, o in zip(self.names, self.params, self._offsets) if n in copied}
        self._holders = [self.copies.get(n, p) for n, p in zip(self.names, self.params)]  # where each gradient lands
        self.refresh_copies()
        n = max(self.hi - self.lo, 0)
        self.exp_avg = torch.zeros(n, dtype=state_dtype, device=self.device)
        self.exp_avg_sq = torch.zeros(n, dtype=state_dtype, device=self.device)
        self.step_count = 0
        self._blocks = self._cut_blocks()
        if self.native:
            self._kernel_blocks = cpu_adamw.AdamWBlocks(
                [self.flat_param[f] for _, f, _, _, _ in self._blocks],
                [self.exp_avg[m] for _, _, m, _, _ in self._blocks],
                [self.exp_avg_sq[m] for _, _, m, _, _ in self._blocks],
                [self.flat_copy[f] if f.start < self.copy_end else None for _, f, _, _, _ in self._blocks],
                [d for d, _, _, _, _ in self._blocks])

    def _cut_blocks(self) -> list[tuple[bool, slice, slice, int, slice]]:
        """(decayed?, slice of the flat buffer, slice of the moments, parameter index, slice of that
        parameter's flattened gradient) for each block of [lo, hi)."""
        if self.hi <= self.lo:  # a rank past the end of a small buffer owns nothing
            return []
        ends = [o + p.numel() for o, p in zip(self._offsets, self.params)]
        cuts = sorted({self.lo, self.hi, *range(self.lo - self.lo % BLOCK + BLOCK, self.hi, BLOCK),
                       *(e for e in [self.decay_end, *ends] if self.lo < e < self.hi)})
        blocks, i = [], 0
        for a, b in zip(cuts, cuts[1:]):
            while ends[i] <= a:
                i += 1
            o = self._offsets[i]
            blocks.append((a < self.decay_end, slice(a, b), slice(a - self.lo, b - self.lo), i, slice(a - o, b - o)))
        return blocks

    def refresh_copies(self) -> None:
        """Rewrites the compute copies from the masters (after the masters were loaded or gathered)."""
        self.flat_copy.copy_(self.flat_param[:self.copy_end])

    def zero_grad(self) -> None:
        """Drops every gradient; the next backward hands each parameter a fresh one (module docstring)."""
        for h in self._holders:
            h.grad = None
        self._folded = False

    def _grads(self) -> list[torch.Tensor]:
        """Each parameter's gradient, flattened: its slice of the flat buffer once folded, else backward's own
        tensor (bf16 for a compute copy; a zero tensor for a parameter that got none)."""
        if self._folded:
            return [self.flat_grad[o:o + p.numel()] for p, o in zip(self.params, self._offsets)]
        out = []
        for h in self._holders:
            g = h.grad
            out.append(torch.zeros(h.numel(), device=self.device) if g is None else g.reshape(-1))
        return out

    def fold_grads(self) -> torch.Tensor:
        """Adds the gradients backward left since the last fold into the fp32 flat buffer (the first fold of a
        step overwrites it), drops them and returns the buffer: after each of several micro-batches, and
        before a collective over ranks (the update then reads the buffer)."""
        if self.flat_grad is None:
            self.flat_grad = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        for h, o in zip(self._holders, self._offsets):
            view, g = self.flat_grad[o:o + h.numel()], h.grad
            if g is None:
                if not self._folded:
                    view.zero_()
            elif self._folded:
                view.add_(g.reshape(-1))
            else:
                view.copy_(g.reshape(-1))
            h.grad = None
        self._folded = True
        return self.flat_grad

    def grad_sq_sum(self) -> torch.Tensor:
        """Σ g² over this group's (replicated or local) gradients, returned as fp64 for the cross-rank sum; the
        same sum whether or not the gradients were folded. On the CPU one native pass per gradient (bf16 or
        fp32, accumulated in fp64); elsewhere one BLAS dot per parameter (relative error ~1e-5 at 9M elements,
        plenty for clipping at 1.0), summed in fp64, with no temporary the size of the gradients."""
        grads = self._grads()
        if self.native:
            return torch.tensor(cpu_adamw.sum_squares(grads), dtype=torch.float64)
        dots = [torch.dot(g, g) for g in grads]
        return torch.stack(dots).double().sum() if dots else torch.zeros((), dtype=torch.float64, device=self.device)

    # -- the update -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """One AdamW step with the gradients times `grad_scale` (the clip factor)."""
        self.step_count += 1
        if self.hi > self.lo:
            (self._step_native if self.native else self._step_fused)(lr, grad_scale, self._grads())
        if self.world > 1:
            mine = self.flat_param[self.lo:self.lo + self.shard].clone()  # this rank's slot, padding included
            dist.all_gather(list(self.flat_param.chunk(self.world)), mine, group=self.group)
            self.refresh_copies()

    def _step_native(self, lr: float, grad_scale: float, grads: list[torch.Tensor]) -> None:
        self._kernel_blocks.step([grads[i][g] for _, _, _, i, g in self._blocks], lr=lr, beta1=self.betas[0],
                                 beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay,
                                 step=self.step_count, grad_mult=grad_scale)

    def _step_fused(self, lr: float, grad_scale: float, grads: list[torch.Tensor]) -> None:
        # the clip factor goes into the fused kernel, as the divisor its own `grad_scale` argument is
        # (1 / factor); it scales each gradient as it reads it, and writes it back (the gradients are
        # dropped before the next backward): one pass over the gradients less than a separate mul_,
        # measured 6.5 against 8.3 ms at 9.8M parameters
        unscale = {} if grad_scale == 1.0 else {"grad_scale": torch.tensor(1.0 / grad_scale, device=self.device)}
        step = torch.tensor(float(self.step_count), device=self.device)
        b1, b2 = self.betas
        widen = self.state_dtype != torch.float32  # the fused kernel's tensors share one dtype (module docstring)
        for decayed in (True, False):  # matrices (decayed) come first in the buffer, then vectors
            blocks = [(flat, m, grads[i][g]) for d, flat, m, i, g in self._blocks if d == decayed]
            if blocks:
                stored = [(self.exp_avg[m], self.exp_avg_sq[m]) for _, m, _ in blocks]
                moments = [(a.float(), b.float()) for a, b in stored] if widen else stored
                torch._fused_adamw_(
                    [self.flat_param[f] for f, _, _ in blocks], [g for _, _, g in blocks],
                    [a for a, _ in moments], [b for _, b in moments], [],
                    [step] * len(blocks), lr=lr, beta1=b1, beta2=b2, eps=self.eps,
                    weight_decay=self.weight_decay if decayed else 0.0, amsgrad=False, maximize=False,
                    **unscale)
                if widen:
                    for (a, b), (a32, b32) in zip(stored, moments):
                        a.copy_(a32)
                        b.copy_(b32)

    # -- state, keyed by parameter name so any layout can load it ---------------------------------
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        padded = torch.zeros(self.shard, dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[: self.numel]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) moments per parameter name; collective when sharded."""
        out = {}
        for key, t in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            flat, offset = self._gather(t), 0
            for name, prm in zip(self.names, self.params):
                out[f"{name}.{key}"] = flat[offset:offset + prm.numel()].view_as(prm).cpu().clone()
                offset += prm.numel()
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        self.step_count = step
        for key, dst in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
            missing = [n for n in self.names if f"{n}.{key}" not in tensors]
            if missing:
                raise KeyError(f"optimizer state lacks {key} for {missing[:3]}{'...' if len(missing) > 3 else ''}")
            # saved in either dtype; bf16 read into bf16 moments is exact, fp32 into bf16 rounds once
            flat = torch.cat([tensors[f"{n}.{key}"].reshape(-1).float().to(self.device) for n in self.names]
                             or [dst.new_zeros(0, dtype=torch.float32)])
            dst.copy_(flat[self.lo:self.hi])

    def memory_bytes(self) -> int:
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * self.exp_avg.element_size()


class ComputeCopies:
    """Runs a model on its optimizers' compute copies: inside `with`, each copied parameter is swapped for its
    copy in its module (the graph built there keeps the copies for backward); on leaving, the model's own
    parameters, the fp32 masters that checkpoints and export read, are put back."""

    def __init__(self, model: nn.Module, *optimizers: FlatAdamW):
        self.slots = []  # (module, attribute, copy), resolved once
        for opt in optimizers:
            for name, copy in opt.copies.items():
                owner, _, attr = name.rpartition(".")
                self.slots.append((model.get_submodule(owner), attr, copy))
        self.masters = [module._parameters[attr] for module, attr, _ in self.slots]

    def __enter__(self):
        for module, attr, copy in self.slots:
            module._parameters[attr] = copy

    def __exit__(self, *exc):
        for (module, attr, _), master in zip(self.slots, self.masters):
            module._parameters[attr] = master
