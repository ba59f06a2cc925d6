"""The zero-bubble W split (DualPipe's; Qi et al., "Zero Bubble Pipeline Parallelism"): a backward that computes
only the input gradients, and a later W op that computes the weight gradients it left.

Why: a pipeline rank waits for gradients to come back; the weight gradients are needed by no other rank, so the
schedule may run them later, in time the rank would otherwise idle. DualPipeV (`pipeline_plan.schedule`) defers
them in its phase 3 (B1 then at once W, before F1), in the second half of phase 6 and in phase 7, and runs the
deferred ones in W ops (phases 3, 7 and 8), first in, first out. The executor (`train.pipeline`) owns one store
per step.

How: whether a chunk's backward defers is known when its forward runs (the op list is fixed), so the forward of
such a (chunk, micro-batch) runs inside `WeightGradStore.recording(key)`, which switches on
`ops.deferring_weight_grads` for this thread only (DualPipeV's overlap thread runs another micro-batch's backward
meanwhile, and a thread's forward is the only place the choice is read; on a GPU backward runs in the autograd
engine's device threads, which is why it is not read at backward). The weight-carrying GEMMs built there detach
their weight and, in backward, compute the input gradient and file (weight, compute) in the key's bucket. After
that backward the executor `seal`s the key (its bucket joins the queue); a W op `pop`s the oldest set and runs
it: every compute() in filing order, then one `torch.autograd.backward(weights, grads)`, so each gradient goes
through the weight's own graph (autocast's casts, the stacked gate/up and q_a/kv_a concatenations) into the
parameters' `.grad` by autograd's own accumulation (set when None, else add), as the full backward would have.

What is deferred (the GEMMs whose weights are parameters and which run through one dispatch point):

| GEMM | where | deferred |
|---|---|---|
| attention projections (q_a+kv_a, q_b, kv_b, o), dense and shared-expert FFN | `ops.linear` (`F.linear`) | yes |
| the same under FP8 (`train.fp8`) | `ops.linear` -> `fp8.FP8Linear` | yes (Wgrad) |
| routed experts, bf16 on an AMX CPU | `ops.expert_ffn` -> `amx.grouped_linear` | yes |
| routed experts, `torch._grouped_mm` (fp32 on the CPU, GPUs) | `ops.expert_ffn` -> `expert_matmul` | yes |
| routed experts under FP8 (per expert through `ops.linear`) | `ops.expert_ffn` | yes |
| routed experts, bmm of equal groups / per-expert loop (fallbacks) | `ops.expert_ffn` -> `expert_matmul` | yes |
| router gate (fp32 `F.linear`), MTP's `eh_proj` (`nn.Linear`), head (fused loss), embedding, norms | model | no |

Not deferred means computed in the B as before: correct, only not moved. A GEMM is deferred only where its input
needs a gradient too (otherwise detaching the weight would cut the output from the graph) and grad mode is on.

Exactness: the deferred GEMMs are the ones autograd runs for the plain ops, so each parameter gets the same
gradient bits; the executor folds gradients after every B and every W (`fold_grads`), so each fold still sees
one micro-batch's gradient per parameter, in micro-batch order, and a step gives the same bits with the split or
without (tests/train/test_pipeline_train.py). Each weight tensor must feed one GEMM per forward (true of this
model): a weight used twice would have its two gradients accumulated separately.

Where it has run: on the CPU only (fp32, bf16 with and without the AMX kernel, FP8 emulated). The
`torch._grouped_mm` and FP8 "cuda" paths are written for GPUs and have not run on one.
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch

from sourcelm.kernels import ops


class WeightGradStore:
    """Deferred weight gradients of one pipeline step, per (chunk, micro-batch) backward (module docstring)."""

    def __init__(self):
        self._open: dict[tuple[int, int], list] = {}  # key -> (weight, compute) filed by its backward so far
        self._queue: deque[tuple[tuple[int, int], list]] = deque()  # sealed sets, oldest first

    @contextlib.contextmanager
    def recording(self, key: tuple[int, int]):
        """Runs the forward of `key` (in this thread) so that its backward files its weight gradients here."""
        if key in self._open:
            raise RuntimeError(f"weight gradients of {key} are already being recorded")
        self._open[key] = []
        with ops.deferring_weight_grads(self._open[key]):
            yield

    def records(self, key: tuple[int, int]) -> bool:
        return key in self._open

    def seal(self, key: tuple[int, int]) -> None:
        """After the backward of `key`: its weight gradients wait in the queue for a W op."""
        self._queue.append((key, self._open.pop(key)))

    def pop(self, key: tuple[int, int] | None = None) -> tuple[int, int]:
        """Runs the oldest sealed set (which must be `key`'s when given) and returns its key."""
        if not self._queue:
            raise RuntimeError("a W op ran with no deferred weight gradients waiting")
        got, filed = self._queue.popleft()
        if key is not None and got != key:
            raise RuntimeError(f"the W op of {key} found the weight gradients of {got} first in the queue")
        if filed:
            weights = [w for w, _ in filed]
            grads = [compute() for _, compute in filed]
            torch.autograd.backward(weights, grads)
        # Emptied, not just dropped: every GEMM's autograd node holds its sink, the sink this list, the list each
        # GEMM's compute(), and a compute() its input, whose graph leads back to the earlier GEMMs' nodes. That
        # cycle runs through autograd's C++ nodes, which Python's collector cannot see, so it would keep every
        # deferred forward's graph and inputs alive for good (a leak of a micro-batch's activations per W op).
        filed.clear()
        return got

    def __len__(self) -> int:
        """Sets recorded or sealed and not yet run."""
        return len(self._open) + len(self._queue)
