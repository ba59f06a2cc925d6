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

DualPipe's overlap (report Figure 4): in DualPipeV's F&B pairs (the ops `pipeline_plan` marks `paired`) the forward
of one micro-batch and the backward of another run at the same time, the backward in a second thread, so that the
all-to-alls and pipeline receives of each wait while the other computes. Each direction has its own process groups
(the topology's backward lane: backward computation's collectives and the gradient messages run there), so the two
threads never issue collectives on one group. The bits are those of running the pair in order (`parallel.pp_overlap
= false`): the two halves share no tensor they write (different chunks, different micro-batches; gradients are
folded by the backward alone, statistics summed by the forward alone). On the CPU the gain is the communication
hidden; the two threads also share the cores.

The zero-bubble W split (`parallel.pp_zero_bubble`, DualPipeV; `train.weight_grad`): the forward of a (chunk,
micro-batch) whose B the schedule marks `defer_w` runs inside the step's `WeightGradStore.recording`, so that B
computes the input gradients only and sends them on without waiting for the weights'; the W op the schedule puts
later runs the weight gradients it left, first in, first out. Gradients are folded (`work.fold_grads`, several
micro-batches) after every B and every W: each fold then holds one micro-batch's gradient of any parameter, and
every parameter's gradients reach the fp32 buffer in micro-batch order, as without the split, so the step's bits
are the same. The store must be empty when the step's ops are done.

Trace: with the environment variable SOURCELM_PIPELINE_TRACE=DIR each rank appends, per step, one JSON line to
DIR/rank<R>.jsonl: every op's start and end (and whether it was half of a pair; a B that defers its weight
gradients is written "Bi", its W "W", the simulator's names), every send's time and every receive's start and end
(tag and peer), on the machine's monotonic clock (`time.perf_counter`, shared by the processes of one machine),
from which `bench/pipeline.py` measures the message latency and draws the timeline.

Not done (stated, not pretended): the path is written for NCCL as well (device tensors, the same op order on both
ends of every link; NCCL ignores tags; on a GPU both threads launch on the current stream, so the overlap is of
communication with compute, which is what DualPipe overlaps) but has only run on gloo.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from sourcelm.parallel.pipeline_plan import chunk_rank, n_chunks, rank_chunks, schedule
from sourcelm.train.executor import StepResult, StepWork, model_inputs
from sourcelm.train.weight_grad import WeightGradStore

ACT, GRAD, EMB, EMB_GRAD = range(4)  # message kinds
TRACE_ENV = "SOURCELM_PIPELINE_TRACE"


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


class Lane:
    """One thread's part of an op or a pair: when it started and ended, and the intervals its receives waited."""

    def __init__(self):
        self.start = self.end = 0.0
        self.waits: list[tuple[float, float]] = []
        self.error: BaseException | None = None

    def busy(self) -> list[tuple[float, float]]:
        """[start, end] less the waits: the intervals this lane computed."""
        out, at = [], self.start
        for s, e in self.waits:
            out.append((at, s))
            at = e
        return [(s, e) for s, e in out + [(at, self.end)] if e > s]


def covered(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of intervals: the time at least one lane computed."""
    total, reach = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e > reach:
            total += e - max(s, reach)
            reach = e
    return total


class PipelineExecutor:
    def __init__(self, topo, model_cfg, ranges: list[range], kind: str, act_shape: tuple[int, int, int],
                 device: torch.device, overlap: bool = False, link_stats=None, zero_bubble: bool = True):
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
        self.overlap = overlap and kind == "dualpipev"
        self.zero_bubble = zero_bubble
        self._store = WeightGradStore()
        self._defers: set[tuple[int, int]] = set()  # this step's (chunk, micro-batch) whose B defers
        backward_pp = topo.backward_groups.get("pp")
        if self.overlap and backward_pp is None:
            raise RuntimeError("overlapped F&B pairs need the topology's backward lane (build_topology(backward_lane="
                               "True), as topology_from_config does with parallel.pp_overlap)")
        # activations go forward on the default group, gradients back on the backward lane's (None: default)
        self._groups = {ACT: None, EMB: None, GRAD: backward_pp, EMB_GRAD: backward_pp}
        self.link_stats = link_stats  # the dispatcher's, for the all-to-all wait per step
        trace = os.environ.get(TRACE_ENV)
        self._trace_file = Path(trace) / f"rank{topo.rank}.jsonl" if trace else None
        self._events: list[dict] = []  # this step's trace (module docstring); appended from both threads of a pair

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
            self._pending.append((dist.isend(t, peer, group=self._groups[kind], tag=tag), t))
            self._events.append({"send": tag, "peer": peer, "t": time.perf_counter()})

    def _recv(self, chunk: int, kind: int, tag_chunk: int, m: int, lane: Lane) -> torch.Tensor:
        tag = self._tag(kind, tag_chunk, m)
        if tag in self._mailbox:
            return self._mailbox.pop(tag)
        buf = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        start = time.perf_counter()
        dist.recv(buf, self._peer(chunk), group=self._groups[kind], tag=tag)
        lane.waits.append((start, time.perf_counter()))
        self._events.append({"recv": tag, "peer": self._peer(chunk), "start": start, "end": lane.waits[-1][1]})
        return buf

    # -- the step -----------------------------------------------------------------------------------------------
    def run(self, model: nn.Module, work: StepWork) -> StepResult:
        self._live = {}
        self._parts = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._counts = torch.zeros(self.n_rows, self.cfg.n_routed_experts, dtype=torch.int64, device=self.device)
        self._timing = {k: 0.0 for k in ("busy", "wait", "F", "B", "Bi", "W", "FB")}
        self._timing.update({f"n_{k}": 0 for k in ("F", "B", "Bi", "W", "FB")}, in_flight=0)
        if self.link_stats is not None:
            self.link_stats.take_wait()
        self._events = []
        start = time.perf_counter()
        ops = schedule(self.topo.stage, self.pp, work.n_micro, self.kind, self.zero_bubble)
        self._store = WeightGradStore()
        self._forwards = self._backwards = 0
        self._defers = {(op.chunk, op.micro_batch) for op in ops if op.defer_w}
        i = 0
        while i < len(ops):
            if ops[i].paired:
                self._pair(model, work, ops[i], ops[i + 1])
                i += 2
            else:
                self._alone(model, work, ops[i])
                i += 1
        self._drain()
        if len(self._store):
            raise RuntimeError(f"{len(self._store)} deferred weight-gradient sets left after the step's ops")
        self._timing["step"] = time.perf_counter() - start
        if self._trace_file is not None:
            self._trace_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self._trace_file, "a") as f:
                f.write(json.dumps({"rank": self.topo.rank, "stage": self.topo.stage, "start": start,
                                    "end": start + self._timing["step"], "events": self._events}) + "\n")
        return StepResult(self._parts, self._counts)

    def _op(self, model, work: StepWork, op, lane: Lane, paired: bool = False) -> None:
        lane.start = time.perf_counter()
        try:
            if op.kind == "F":
                self._forward(model, work, op.chunk, op.micro_batch, lane)
            elif op.kind == "B":
                self._backward(work, op.chunk, op.micro_batch, lane)
            else:
                self._weights(work, op.chunk, op.micro_batch)
        except BaseException as e:  # re-raised by the thread that waits for this lane
            lane.error = e
        lane.end = time.perf_counter()
        self._events.append({"op": "Bi" if op.defer_w else op.kind, "chunk": op.chunk, "mb": op.micro_batch,
                             "start": lane.start, "end": lane.end, "paired": paired})

    def _alone(self, model, work: StepWork, op) -> None:
        lane = Lane()
        self._op(model, work, op, lane)
        if lane.error is not None:
            raise lane.error
        busy = covered(lane.busy())  # an op's compute: its wall time less the time its receives waited
        self._count(lane.end - lane.start - busy, busy)
        kind = "Bi" if op.defer_w else op.kind
        self._timing[kind] += busy
        self._timing[f"n_{kind}"] += 1

    def _pair(self, model, work: StepWork, f_op, b_op) -> None:
        """DualPipe's F&B: the backward in a second thread while this one runs the forward (module docstring), or
        one after the other without `overlap`. The pair's busy time is when at least one of the two computed."""
        f, b = Lane(), Lane()
        if self.overlap:
            thread = threading.Thread(target=self._op, args=(model, work, b_op, b, True), name="pipeline-backward")
            thread.start()
            self._op(model, work, f_op, f, True)
            thread.join()
        else:
            self._op(model, work, f_op, f, True)
            if f.error is None:
                self._op(model, work, b_op, b, True)
        for lane in (f, b):
            if lane.error is not None:
                raise lane.error
        busy = covered(f.busy() + b.busy())
        self._count(sum(e - s for lane in (f, b) for s, e in lane.waits), busy)
        self._timing["FB"] += max(f.end, b.end) - f.start
        self._timing["n_FB"] += 1

    def _count(self, wait: float, busy: float) -> None:
        self._timing["wait"] += wait
        self._timing["busy"] += busy

    def stats(self) -> dict[str, float]:
        """This rank's figures of the last step: compute seconds (time at least one thread computed), pipeline
        receive-wait seconds (summed over both threads of a pair), all-to-all wait seconds (likewise), mean times of
        F, B (with its weight gradients), Bi (a B deferring them) and W run alone and of F&B pairs (wall), the most
        micro-batch chunk states alive at once (the activation memory the schedule holds), peak RSS."""
        t = self._timing
        if "step" not in t:
            return {}
        out = {"pp_step_s": t["step"], "pp_busy_s": t["busy"], "pp_wait_s": t["wait"],
               "pp_f_ms": 1e3 * t["F"] / max(t["n_F"], 1), "pp_b_ms": 1e3 * t["B"] / max(t["n_B"], 1),
               "pp_bi_ms": 1e3 * t["Bi"] / max(t["n_Bi"], 1), "pp_w_ms": 1e3 * t["W"] / max(t["n_W"], 1),
               "pp_fb_ms": 1e3 * t["FB"] / max(t["n_FB"], 1), "pp_in_flight": t["in_flight"],
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.link_stats is not None:
            out["ep_wait_s"] = self.link_stats.take_wait()
        return out

    def _drain(self) -> None:
        """Waits for every send in flight (each waited once: gloo's send handles must not be waited twice)."""
        for handle, _ in self._pending:
            handle.wait()
        self._pending = []

    def _forward(self, model, work: StepWork, c: int, m: int, lane: Lane) -> None:
        last, live = c == self.n_chunks - 1, {}
        # chunk states held: forwards started less backwards ended (the simulator's count). Two counters, each
        # written by one thread at a time: forwards run in the step's own thread, backwards one at a time
        self._forwards += 1
        self._timing["in_flight"] = max(self._timing["in_flight"], self._forwards - self._backwards)
        inputs, labels, token_mask = model_inputs(work.batch(m))  # every chunk: the padding mask (SFT) counts
        # a B that defers its weight gradients is decided here, where its GEMMs are built (train.weight_grad)
        defers = self._store.recording((c, m)) if (c, m) in self._defers else contextlib.nullcontext()
        with work.compute(), defers:
            if c == 0:
                x = model.embed(inputs)
                if self.has_mtp:  # the MTP module's embedding rows, exact through a detached copy (module docstring)
                    live["emb"] = x
                    if self._peer(self.n_chunks - 1) == self.topo.rank:
                        self._live[("mtp_emb", m)] = x.detach().requires_grad_()
                    else:
                        self._send(x, self.n_chunks - 1, EMB, 0, m)
            else:
                x = self._recv(c - 1, ACT, c, m, lane).requires_grad_()
                live["x"] = x
            h, counts, balances = model.blocks(x, self.ranges[c], token_mask, self.alpha)
            if last:
                emb = None
                if self.has_mtp:
                    emb = (self._live.pop(("mtp_emb", m)) if ("mtp_emb", m) in self._live
                           else self._recv(0, EMB, 0, m, lane).requires_grad_())
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

    def _backward(self, work: StepWork, c: int, m: int, lane: Lane) -> None:
        live = self._live.pop((c, m))
        roots, grads = live["roots"], live["grads"]
        if grads is None:
            grads = [self._recv(c + 1, GRAD, c, m, lane)] + [None] * (len(roots) - 1)
        if c == 0 and self.has_mtp:  # the MTP module's gradient of the embedding rows joins chunk 0's backward
            grad_emb = (self._live.pop(("mtp_emb_grad", m)) if ("mtp_emb_grad", m) in self._live
                        else self._recv(self.n_chunks - 1, EMB_GRAD, 0, m, lane))
            roots, grads = [*roots, live["emb"]], [*grads, grad_emb]
        torch.autograd.backward(roots, grads)
        if self._store.records((c, m)):
            self._store.seal((c, m))
        if c > 0:
            self._send(live["x"].grad, c - 1, GRAD, c - 1, m)
        if c == self.n_chunks - 1 and self.has_mtp:
            grad_emb = live["mtp_emb"].grad
            if self._peer(0) == self.topo.rank:
                self._live[("mtp_emb_grad", m)] = grad_emb
            else:
                self._send(grad_emb, 0, EMB_GRAD, 0, m)
        if work.n_micro > 1:  # summed in fp32 (the compute copies' gradients are bf16); deferred ones after their W
            work.fold_grads()
        self._backwards += 1

    def _weights(self, work: StepWork, c: int, m: int) -> None:
        """The W op: the weight gradients the B of (c, m) deferred, the oldest waiting, into `.grad`, then folded."""
        self._store.pop((c, m))
        if work.n_micro > 1:
            work.fold_grads()

    @torch.no_grad()
    def final_hidden(self, model: nn.Module, batch: torch.Tensor, compute) -> torch.Tensor | None:
        """One batch forward through the main layers of the pipeline (no backward, no MTP): the final-normed hidden
        states on the rank holding the last chunk, None elsewhere. Every rank of the pipeline calls it with its
        data-parallel slice of the same batch."""
        result = None
        for c in sorted(self.chunks):
            with compute():
                x = model.embed(batch[:, :-1]) if c == 0 else self._recv(c - 1, ACT, c, 0, Lane())
                h, _, _ = model.blocks(x, self.ranges[c], None, 0.0)
                if c == self.n_chunks - 1:
                    result = model.model.norm(h)
                else:
                    self._send(h, c + 1, ACT, c + 1, 0)
        self._drain()
        return result
