"""The pipeline executor: one step's micro-batches through the pipeline ranks under 1F1B or DualPipeV.

Each rank holds the chunks `pipeline_plan.rank_chunks` gives it (the model pruned to them: `prune_to_chunks`) and
runs its op list (`pipeline_plan.schedule`) in order. A forward op runs its chunk's part of the model
(`DeepseekV3.embed` on chunk 0, `blocks(range)` on every chunk, `head_and_losses` on the last) and sends the
output to the rank of the next chunk; a backward op receives the output's gradient, runs autograd from the
chunk's outputs, and sends the input's gradient back. Sends are asynchronous, receives wait, tensors are fp32
[micro_batch, seq_len, hidden] (the residual stream's dtype) and tagged (kind, chunk, micro-batch), so a message can
only meet the receive it is meant for.

Why not `torch.distributed.pipelining`: its stages pass one tensor from stage to stage and compute the loss on the
last; here the MTP module on the last chunk also needs the embedding rows of the first (kept exact: chunk 0's
embedding output goes to the last chunk, detached, and its gradient comes back and enters chunk 0's backward as a
second root, so the embedding gets the sum of both gradients as in one process), every chunk adds its MoE layers'
balance losses and expert counts, and the schedule must stay an executor of the trainer's (checkpoints, exact resume,
the balancer). The schedules themselves are DeepSeek's and the textbook's (`pipeline_plan.py`).

Not done (stated, not pretended): DualPipe's overlap of one micro-batch's forward with another's backward inside a
pair (here a pair runs F then B; the experts' all-to-all still overlaps the shared expert inside each layer), and
the zero-bubble split of backward into input and weight gradients (W ops are empty). The path is written for NCCL
as well (device tensors, the same op order on both ends of every link; NCCL ignores tags) but has only run on gloo.
"""

from __future__ import annotations

import resource
import time

import torch
import torch.distributed as dist
from torch import nn

from sourcelm.parallel.pipeline_plan import chunk_rank, n_chunks, rank_chunks, schedule
from sourcelm.train.executor import StepResult, StepWork, model_inputs

ACT, GRAD, EMB, EMB_GRAD = range(4)  # message kinds


class ElsewhereLayer(nn.Module):
    """The place of a main layer another pipeline rank holds (so the kept layers keep their global names)."""

    is_moe = False


def prune_to_chunks(model: nn.Module, ranges: list[range], chunks: list[int]) -> None:
    """Drops from a DeepseekV3 every part the given chunks do not hold: the other main layers, the embedding unless
    chunk 0 is here, the final norm, the head and the MTP modules unless the last chunk is."""
    keep = {i for c in chunks for i in ranges[c]}
    for i in range(len(model.model.layers)):
        if i not in keep:
            model.model.layers[i] = ElsewhereLayer()
    if 0 not in chunks:
        model.model.embed_tokens = None
    if len(ranges) - 1 not in chunks:
        model.model.norm = model.lm_head = None
        model.mtp = nn.ModuleList()


def moe_rows(model_cfg, ranges: list[range]) -> tuple[list[list[int]], list[int]]:
    """Per chunk, the rows of the step's expert counts [MoE layers incl. MTP, E] its main layers fill; and the MTP
    layers' rows (the last chunk's too)."""
    index, rows = 0, []
    for r in ranges:
        mine = []
        for i in r:
            if model_cfg.is_moe_layer(i):
                mine.append(index)
                index += 1
        rows.append(mine)
    n = model_cfg.num_hidden_layers
    n_mtp_moe = sum(model_cfg.is_moe_layer(n + d) for d in range(model_cfg.num_nextn_predict_layers))
    mtp = [index + k for k in range(n_mtp_moe)]
    return rows, mtp


class PipelineExecutor:
    def __init__(self, topo, model_cfg, ranges: list[range], kind: str, act_shape: tuple[int, int, int],
                 device: torch.device):
        self.topo, self.cfg, self.ranges, self.kind = topo, model_cfg, ranges, kind
        self.pp = topo.layout.pp
        self.n_chunks = n_chunks(self.pp, kind)
        self.chunks = rank_chunks(topo.stage, self.pp, kind)
        self.shape, self.device = act_shape, device
        self.rows, self.mtp_rows = moe_rows(model_cfg, ranges)
        self.n_rows = sum(map(len, self.rows)) + len(self.mtp_rows)
        self.has_mtp = model_cfg.num_nextn_predict_layers > 0
        self.alpha = model_cfg.balance_loss_alpha
        self._pending, self._mailbox = [], {}  # sends in flight; messages between two chunks of this rank
        self._timing: dict[str, float] = {}

    # -- p2p ----------------------------------------------------------------------------------------------------
    def _peer(self, chunk: int) -> int:
        return self.topo.rank_of_stage(chunk_rank(chunk, self.pp, self.kind))

    def _tag(self, kind: int, chunk: int, m: int) -> int:
        return (m * (self.n_chunks + 1) + chunk) * 4 + kind

    def _send(self, t: torch.Tensor, chunk: int, kind: int, tag_chunk: int, m: int) -> None:
        if t.dtype != torch.float32 or tuple(t.shape) != self.shape:
            raise RuntimeError(f"pipeline message {tuple(t.shape)} {t.dtype}: expected {self.shape} float32")
        t, peer, tag = t.detach().contiguous(), self._peer(chunk), self._tag(kind, tag_chunk, m)
        if peer == self.topo.rank:  # the bottom of DualPipeV's V: both chunks here, handed over in memory
            self._mailbox[tag] = t
        else:
            self._pending.append((dist.isend(t, peer, tag=tag), t))

    def _recv(self, chunk: int, kind: int, tag_chunk: int, m: int) -> torch.Tensor:
        tag = self._tag(kind, tag_chunk, m)
        if tag in self._mailbox:
            return self._mailbox.pop(tag)
        buf = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        start = time.perf_counter()
        dist.recv(buf, self._peer(chunk), tag=tag)
        self._timing["wait"] += time.perf_counter() - start
        return buf

    # -- the step -----------------------------------------------------------------------------------------------
    def run(self, model: nn.Module, work: StepWork) -> StepResult:
        self._live = {}
        self._parts = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._counts = torch.zeros(self.n_rows, self.cfg.n_routed_experts, dtype=torch.int64, device=self.device)
        self._timing = {"wait": 0.0, "F": 0.0, "B": 0.0, "n_F": 0, "n_B": 0, "in_flight": 0}
        start = time.perf_counter()
        for op in schedule(self.topo.stage, self.pp, work.n_micro, self.kind):
            waited, t0 = self._timing["wait"], time.perf_counter()
            if op.kind == "F":
                self._forward(model, work, op.chunk, op.micro_batch)
            else:
                self._backward(work, op.chunk, op.micro_batch)
            # an op's compute: its wall time less the time its receives waited
            self._timing[op.kind] += time.perf_counter() - t0 - (self._timing["wait"] - waited)
            self._timing[f"n_{op.kind}"] += 1
            self._timing["in_flight"] = max(self._timing["in_flight"], sum(isinstance(k[0], int) for k in self._live))
        self._drain()
        self._timing["step"] = time.perf_counter() - start
        return StepResult(self._parts, self._counts)

    def stats(self) -> dict[str, float]:
        """This rank's figures of the last step: compute and receive-wait seconds, mean F and B op times, the most
        micro-batch chunk states alive at once (the activation memory the schedule holds), peak RSS."""
        t = self._timing
        if "step" not in t:
            return {}
        return {"pp_step_s": t["step"], "pp_busy_s": t["F"] + t["B"], "pp_wait_s": t["wait"],
                "pp_f_ms": 1e3 * t["F"] / max(t["n_F"], 1), "pp_b_ms": 1e3 * t["B"] / max(t["n_B"], 1),
                "pp_in_flight": t["in_flight"],
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def _drain(self) -> None:
        """Waits for every send in flight (each waited once: gloo's send handles must not be waited twice)."""
        for handle, _ in self._pending:
            handle.wait()
        self._pending = []

    def _forward(self, model, work: StepWork, c: int, m: int) -> None:
        last, live = c == self.n_chunks - 1, {}
        inputs, labels, token_mask = model_inputs(work.batch(m))  # every chunk: the padding mask (SFT) counts
        with work.compute():
            if c == 0:
                x = model.embed(inputs)
                if self.has_mtp:  # the MTP module's embedding rows, exact through a detached copy (module docstring)
                    live["emb"] = x
                    if self._peer(self.n_chunks - 1) == self.topo.rank:
                        self._live[("mtp_emb", m)] = x.detach().requires_grad_()
                    else:
                        self._send(x, self.n_chunks - 1, EMB, 0, m)
            else:
                x = self._recv(c - 1, ACT, c, m).requires_grad_()
                live["x"] = x
            h, counts, balances = model.blocks(x, self.ranges[c], token_mask, self.alpha)
            if last:
                emb = None
                if self.has_mtp:
                    emb = (self._live.pop(("mtp_emb", m)) if ("mtp_emb", m) in self._live
                           else self._recv(0, EMB, 0, m).requires_grad_())
                    live["mtp_emb"] = emb
                out = model.head_and_losses(h, emb, labels, token_mask, work.mtp_weight, self.alpha, False,
                                            counts, balances)
                live["roots"], live["grads"] = [out.loss * work.loss_scale], [None]
                self._parts += torch.stack([out.loss.detach(), out.main_loss.detach(), out.mtp_loss.detach(),
                                            out.balance_loss.detach()]).double() * work.loss_scale
                self._counts[self.rows[c] + self.mtp_rows] += out.expert_counts
            else:
                self._send(h, c + 1, ACT, c + 1, m)
                live["roots"], live["grads"] = [h], None  # the gradient arrives with the backward op
                if balances:  # this chunk's share of the loss: its MoE layers' balance terms
                    balance = torch.stack(balances).sum() * work.loss_scale
                    live["roots"].append(balance)
                    self._parts += torch.stack([balance.detach(), balance.new_zeros(()), balance.new_zeros(()),
                                                balance.detach()]).double()
                    self._counts[self.rows[c]] += torch.stack(counts)
        self._live[(c, m)] = live

    def _backward(self, work: StepWork, c: int, m: int) -> None:
        live = self._live.pop((c, m))
        roots, grads = live["roots"], live["grads"]
        if grads is None:
            grads = [self._recv(c + 1, GRAD, c, m)] + [None] * (len(roots) - 1)
        if c == 0 and self.has_mtp:  # the MTP module's gradient of the embedding rows joins chunk 0's backward
            grad_emb = (self._live.pop(("mtp_emb_grad", m)) if ("mtp_emb_grad", m) in self._live
                        else self._recv(self.n_chunks - 1, EMB_GRAD, 0, m))
            roots, grads = [*roots, live["emb"]], [*grads, grad_emb]
        torch.autograd.backward(roots, grads)
        if c > 0:
            self._send(live["x"].grad, c - 1, GRAD, c - 1, m)
        if c == self.n_chunks - 1 and self.has_mtp:
            grad_emb = live["mtp_emb"].grad
            if self._peer(0) == self.topo.rank:
                self._live[("mtp_emb_grad", m)] = grad_emb
            else:
                self._send(grad_emb, 0, EMB_GRAD, 0, m)
        if work.n_micro > 1:  # summed in fp32 (the compute copies' gradients are bf16)
            work.fold_grads()

    @torch.no_grad()
    def final_hidden(self, model: nn.Module, batch: torch.Tensor, compute) -> torch.Tensor | None:
        """One batch forward through the main layers of the pipeline (no backward, no MTP): the final-normed hidden
        states on the rank holding the last chunk, None elsewhere. Every rank of the pipeline calls it with its
        data-parallel slice of the same batch."""
        result = None
        for c in sorted(self.chunks):
            with compute():
                x = model.embed(batch[:, :-1]) if c == 0 else self._recv(c - 1, ACT, c, 0)
                h, _, _ = model.blocks(x, self.ranges[c], None, 0.0)
                if c == self.n_chunks - 1:
                    result = model.model.norm(h)
                else:
                    self._send(h, c + 1, ACT, c + 1, 0)
        self._drain()
        return result
