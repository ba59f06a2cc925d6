"""Dispatch and combine for expert parallelism, with DeepEP's normal-mode interface (reference §3.3.2).

    num_tokens_per_rank, num_tokens_per_node, is_token_in_rank = d.layout(topk_idx)
    recv_x, recv_local_expert_idx, recv_topk_weights, handle = d.dispatch(x, topk_idx, topk_weights)
    out = d.combine(y, handle)

* `dispatch` sends each token once to every EP rank holding one of its experts. Received rows are
  grouped by source rank (ascending), then by source token index, in both implementations.
  `recv_local_expert_idx` [N_recv, K] holds local expert ids (global - ep_rank * E_local), -1 where
  that slot's expert lives elsewhere; `recv_topk_weights` is 0 there.
* `combine(y, handle)` returns, for each original token, the unweighted sum of the rows y [N_recv, H]
  of its copies. As in DeepEP's normal mode, the expert side applies the routing weights and sums a
  token's local experts into one row first. The sum has a fixed order (see transport.py), identical
  for both implementations: partial sums per destination node, then the nodes in ascending order.
* Autograd: dispatch's backward is a combine of the gradients (the weights' too), combine's backward
  is a dispatch with the cached route. The backward transfers run on the topology's backward-lane groups
  (the forward groups themselves unless DualPipeV's overlapped pairs asked for a lane: topology.py).
* FP8 (`fp8=True`, under `train.fp8`): dispatch and combine's backward, the two transfers that carry tokens or
  their gradients to the experts, send each row as E4M3 1×128 tiles with power-of-2 scales (`fp8_comm`); the
  forward combine and dispatch's backward stay in the compute dtype, as in the report (§3.3.3). The rows were
  already rounded to that grid (`ops.routed_experts_input` / `routed_experts_output`), so the FP8 wire delivers
  them bit for bit, and the byte counters count the packed rows.
* Overlap: `dispatch_async` / `combine_async` return once the first (inter-node) all-to-all is in
  flight; `.wait()` finishes it. Work done in between (the shared expert) runs during the transfer.
  Backward is split the same way: the second Function's backward starts the transfer and the first
  one's waits for it. The autograd engine runs ready nodes latest-created first, so work created
  between the two (the shared expert, in `ExpertParallelExperts`) has its backward run while the
  dispatch-backward transfer is in flight (tests/parallel/test_experts.py checks the order).

Two implementations, both dropless:
* `FlatDispatcher`: one variable-size all-to-all over the EP group, one copy per (token, rank).
* `TwoHopDispatcher` (report §3.2.2): a token crosses nodes once per destination node, to the rank at
  the same local index there (the IB hop), which forwards it inside its node to the ranks holding
  its experts (the NVLink hop). Combine reduces inside the destination node before one row per
  (token, node) crosses back.
* `ChunkedTwoHopDispatcher`: the same route in chunks, pipelined: each chunk is forwarded inside the
  node as soon as it lands (chunked.py); bit-identical to `TwoHopDispatcher`. Its chunk size is given,
  or measured on the first dispatch (a few sizes, the fastest kept, the choice logged).
All count the bytes they send per link class in `stats` (read and reset by the trainer).
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.distributed as dist

from sourcelm.kernels import fp8_comm
from sourcelm.parallel.chunked import ChunkedTwoHopRoute
from sourcelm.parallel.topology import Topology
from sourcelm.parallel.transport import Hop, LinkStats, Pending, Route, exchange_counts

log = logging.getLogger("sourcelm.parallel")


class Handle:
    """What combine (and every backward) needs from one dispatch: the route and the receive layout."""

    def __init__(self, route: Route, n_tokens: int, hidden: int, fp8: bool = False):
        self.route, self.n_tokens, self.hidden = route, n_tokens, hidden
        self.fp8 = fp8  # dispatch and combine's backward send E4M3 rows (`fp8_comm`)
        # transfers in flight between the two halves of each operation
        self.pending: Pending | None = None  # forward dispatch, then forward combine (never both)
        self.dispatch_bwd: Pending | None = None  # dispatch's backward (a combine of gradients)
        self.combine_bwd: Pending | None = None  # combine's backward (a dispatch of gradients)
        self.recv_local_idx: torch.Tensor | None = None
        self.num_recv_tokens_per_expert: list[int] | None = None


class _DispatchStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, dispatcher, handle):
        ctx.handle, ctx.stats = handle, dispatcher.stats
        payload = fp8_comm.pack_rows(x) if handle.fp8 else x
        handle.pending = handle.route.forward_start([payload, topk_weights, topk_idx], dispatcher.stats)
        x_buf, w_buf, _ = handle.pending.outputs
        # the packed bytes are no gradient's carrier: an empty tensor of x's dtype links x to _DispatchWait instead
        return (x.new_empty(0) if handle.fp8 else x_buf), w_buf

    @staticmethod
    def backward(ctx, _gx_buf, _gw_buf):
        gx, gw = ctx.stats.waited(ctx.handle.dispatch_bwd)
        ctx.handle.dispatch_bwd = None
        return gx, gw, None, None, None


class _DispatchWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_buf, w_buf, dispatcher, handle):
        ctx.handle, ctx.stats = handle, dispatcher.stats
        ctx.bufs = (x_buf.shape, w_buf.shape, x_buf.dtype, w_buf.dtype)
        rows = dispatcher.stats.waited(handle.pending)
        handle.pending = None
        recv_x, recv_w, recv_idx = dispatcher._rest_of_dispatch(handle, rows)
        if handle.fp8:
            recv_x = fp8_comm.unpack_rows(recv_x, handle.hidden, x_buf.dtype)
        local = recv_idx - dispatcher.topo.local_experts.start
        local = torch.where((local >= 0) & (local < dispatcher.e_local), local, torch.full_like(local, -1))
        recv_w = torch.where(local >= 0, recv_w, torch.zeros_like(recv_w))
        handle.recv_local_idx = local
        ctx.mark_non_differentiable(local)
        return recv_x, local, recv_w

    @staticmethod
    def backward(ctx, g_x, _g_idx, g_w):
        h = ctx.handle
        x_shape, w_shape, x_dtype, w_dtype = ctx.bufs
        n = h.recv_local_idx.shape[0]
        if g_x is None:
            g_x = torch.zeros((n, h.hidden), dtype=x_dtype, device=h.recv_local_idx.device)
        if g_w is None:
            g_w = torch.zeros((n,) + tuple(w_shape[1:]), dtype=w_dtype, device=h.recv_local_idx.device)
        g_w = torch.where(h.recv_local_idx >= 0, g_w, torch.zeros_like(g_w))  # slots not held here
        h.dispatch_bwd = h.route.reverse_start([g_x.contiguous(), g_w.contiguous()], ctx.stats, backward=True)
        return (torch.zeros((), dtype=x_dtype, device=g_x.device).expand(x_shape),
                torch.zeros((), dtype=w_dtype, device=g_x.device).expand(w_shape), None, None)


class _CombineStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, dispatcher, handle):
        ctx.handle, ctx.stats, ctx.y = handle, dispatcher.stats, (y.shape[1], y.dtype)
        handle.pending = handle.route.reverse_start([y.contiguous()], dispatcher.stats)
        return handle.pending.outputs[0]

    @staticmethod
    def backward(ctx, _g_buf):
        (g,) = ctx.stats.waited(ctx.handle.combine_bwd)
        ctx.handle.combine_bwd = None
        (g_y,) = ctx.handle.route.forward_rest([g], ctx.stats, backward=True)
        if ctx.handle.fp8:
            g_y = fp8_comm.unpack_rows(g_y, *ctx.y)
        return g_y, None, None


class _CombineWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buf, dispatcher, handle):
        ctx.handle, ctx.stats, ctx.buf = handle, dispatcher.stats, (buf.shape, buf.dtype)
        (out,) = dispatcher.stats.waited(handle.pending)
        handle.pending = None
        return out

    @staticmethod
    def backward(ctx, g_out):
        g = fp8_comm.pack_rows(g_out) if ctx.handle.fp8 else g_out.contiguous()
        ctx.handle.combine_bwd = ctx.handle.route.forward_start([g], ctx.stats, backward=True)
        shape, dtype = ctx.buf
        return torch.zeros((), dtype=dtype, device=g_out.device).expand(shape), None, None


class InFlight:
    """A dispatch or combine whose first all-to-all is in flight; `wait()` returns its results."""

    def __init__(self, finish):
        self._finish = finish

    def wait(self):
        return self._finish()


class Dispatcher:
    """Common interface; subclasses build the route. One dispatcher serves every MoE layer."""

    kind = ""

    def __init__(self, topo: Topology):
        self.topo = topo
        lay = topo.layout
        self.n_experts, self.e_local = lay.n_routed_experts, lay.experts_per_rank
        self.n_ranks, self.n_nodes, self.ranks_per_ep_node = lay.ep, lay.ep_nodes, lay.ep_local
        self.stats = LinkStats()

    # ---- DeepEP-shaped public API
    def layout(self, topk_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """topk_idx [T, K] (global expert ids, -1 = none) -> (num_tokens_per_rank [R] int64,
        num_tokens_per_node [N] int64, is_token_in_rank [T, R] bool), over this EP group."""
        t = topk_idx.shape[0]
        if topk_idx.numel() and (int(topk_idx.max()) >= self.n_experts or int(topk_idx.min()) < -1):
            raise ValueError(f"topk_idx holds ids outside [-1, {self.n_experts}); the router and the "
                             f"dispatcher disagree on the number of routed experts")
        dest = torch.where(topk_idx >= 0, topk_idx // self.e_local, torch.full_like(topk_idx, self.n_ranks))
        in_rank = torch.zeros(t, self.n_ranks + 1, dtype=torch.bool, device=topk_idx.device)
        in_rank.scatter_(1, dest, True)
        in_rank = in_rank[:, : self.n_ranks]
        in_node = in_rank.view(t, self.n_nodes, self.ranks_per_ep_node).any(-1)
        return in_rank.sum(0), in_node.sum(0), in_rank

    def dispatch_async(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                       fp8: bool = False) -> InFlight:
        """Starts a dispatch; `.wait()` -> (recv_x, recv_local_expert_idx, recv_topk_weights, handle). fp8: x and
        combine's backward travel as E4M3 rows (x must be on the power-of-2 tile grid already, or it is rounded)."""
        if topk_idx.shape != topk_weights.shape or x.shape[0] != topk_idx.shape[0]:
            raise ValueError(f"x {tuple(x.shape)}, topk_idx {tuple(topk_idx.shape)} and topk_weights "
                             f"{tuple(topk_weights.shape)} must agree on tokens and slots")
        handle = Handle(self._first_hop(topk_idx, x.device), x.shape[0], x.shape[1], fp8)
        x_buf, w_buf = _DispatchStart.apply(x, topk_weights, topk_idx, self, handle)

        def finish():
            recv_x, local, recv_w = _DispatchWait.apply(x_buf, w_buf, self, handle)
            valid = local[local >= 0]
            handle.num_recv_tokens_per_expert = torch.bincount(valid, minlength=self.e_local).tolist()
            return recv_x, local, recv_w, handle

        return InFlight(finish)

    def dispatch(self, x, topk_idx, topk_weights, fp8: bool = False):
        return self.dispatch_async(x, topk_idx, topk_weights, fp8).wait()

    def combine_async(self, y: torch.Tensor, handle: Handle) -> InFlight:
        """Starts a combine of y [N_recv, H]; `.wait()` -> [T, H]."""
        if handle.recv_local_idx is None or y.shape[0] != handle.recv_local_idx.shape[0]:
            raise ValueError(f"combine got {y.shape[0]} rows; the dispatch behind this handle received "
                             f"{None if handle.recv_local_idx is None else handle.recv_local_idx.shape[0]}")
        buf = _CombineStart.apply(y, self, handle)
        return InFlight(lambda: _CombineWait.apply(buf, self, handle))

    def combine(self, y, handle):
        return self.combine_async(y, handle).wait()

    # ---- route construction (subclasses)
    def _first_hop(self, topk_idx, device) -> Route:
        raise NotImplementedError

    def _rest_of_dispatch(self, handle: Handle, rows: list[torch.Tensor]) -> list[torch.Tensor]:
        """Takes the rows of the first hop (x, weights, global expert ids) to their final ranks,
        completing the route on the way (the two-hop dispatcher adds its intra-node hop here)."""
        return handle.route.forward_rest(rows, self.stats)

    def _hop(self, kind: str, is_in: torch.Tensor, fold_groups, device) -> Hop:
        """A hop over this rank's group `kind` sending row i to peer p where is_in[i, p]."""
        group, members = self.topo.groups[kind], self.topo.members[kind]
        pairs = is_in.t().nonzero()  # (peer, row), peer-major, rows ascending
        send = is_in.sum(0).tolist()
        rpn = self.topo.ranks_per_node
        links = ["local" if r == self.topo.rank else
                 "intra_node" if r // rpn == self.topo.node else "inter_node" for r in members]
        groups = (group, self.topo.group(kind, backward=True)) if len(members) > 1 else (None, None)
        return Hop(groups, links, pairs[:, 1].contiguous(), send,
                   exchange_counts(send, group if len(members) > 1 else None, device),
                   is_in.shape[0], fold_groups)


class FlatDispatcher(Dispatcher):
    """One all-to-all over the EP group; a token copy per destination rank."""

    kind = "flat"

    def _first_hop(self, topk_idx, device) -> Route:
        _, _, in_rank = self.layout(topk_idx)
        el = self.ranks_per_ep_node
        by_node = [list(range(n * el, (n + 1) * el)) for n in range(self.n_nodes)]
        return Route([self._hop("ep", in_rank, by_node, device)])


class TwoHopDispatcher(Dispatcher):
    """Across nodes once per destination node (same local index), then inside the node."""

    kind = "two_hop"

    def _first_hop(self, topk_idx, device) -> Route:
        _, _, in_rank = self.layout(topk_idx)
        in_node = in_rank.view(-1, self.n_nodes, self.ranks_per_ep_node).any(-1)
        return Route([self._hop("ep_inter", in_node, [[n] for n in range(self.n_nodes)], device)])

    def _rest_of_dispatch(self, handle, rows):
        x1, w1, idx1 = rows
        el = self.ranks_per_ep_node
        # Rows from EP node n' were sent by position n' * el + (my local index).
        recv1 = torch.tensor(handle.route.hops[0].recv_splits, device=x1.device)
        src_rank = torch.repeat_interleave(torch.arange(self.n_nodes, device=x1.device), recv1) * el \
            + self.topo.ep_local_rank
        valid = idx1 >= 0
        rank_of = torch.where(valid, idx1 // self.e_local, torch.full_like(idx1, -1))
        here = valid & (rank_of // el == self.topo.ep_node)
        dest_local = torch.where(here, rank_of % el, torch.full_like(idx1, el))
        in_local = torch.zeros(idx1.shape[0], el + 1, dtype=torch.bool, device=x1.device)
        in_local.scatter_(1, dest_local, True)
        hop2 = self._hop("ep_intra", in_local[:, :el], [[p] for p in range(el)], x1.device)
        meta = torch.cat([idx1, src_rank[:, None]], dim=1)
        x2, w2, meta2 = hop2.forward([x1, w1, meta], self.stats, alias=True).wait()
        handle.route.hops.append(hop2)
        # Final order: by source position, then source token. Each forwarder delivers a position's
        # rows in token order, so a stable sort on the source position is enough.
        perm = meta2[:, -1].argsort(stable=True)
        if bool((perm == torch.arange(perm.numel(), device=perm.device)).all()):
            return [x2, w2, meta2[:, :-1]]  # already in order (one rank per node): skip the copies
        handle.route.perm = perm
        return [x2.index_select(0, perm), w2.index_select(0, perm), meta2[:, :-1].index_select(0, perm)]


class ChunkedTwoHopDispatcher(Dispatcher):
    """Two-hop in chunks of `chunk_rows` rows per (source, destination node), forwarded as they land.
    chunk_rows None: measured on the first dispatch among CHUNK_FRACTIONS of the largest per-node row count."""

    kind = "two_hop_chunked"
    CHUNK_FRACTIONS = (1, 2, 4, 8, 16)

    def __init__(self, topo: Topology, chunk_rows: int | None = None):
        super().__init__(topo)
        if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                       or chunk_rows < 1):
            raise ValueError(f"dispatch chunk_rows = {chunk_rows!r}: give a positive number of rows per chunk, "
                             f"or None to measure it on the first dispatch")
        self.chunk_rows = chunk_rows
        self.tuning: dict[int, float] = {}  # chunk rows -> slowest rank's dispatch + combine seconds

    def dispatch_async(self, x, topk_idx, topk_weights, fp8: bool = False) -> InFlight:
        if self.chunk_rows is None:
            self._measure_chunk_rows(x, topk_idx, topk_weights, fp8)
        return super().dispatch_async(x, topk_idx, topk_weights, fp8)

    def _first_hop(self, topk_idx, device):
        _, _, in_rank = self.layout(topk_idx)
        in_node = in_rank.view(-1, self.n_nodes, self.ranks_per_ep_node).any(-1)
        return ChunkedTwoHopRoute(self, in_node, self.chunk_rows)

    def _rest_of_dispatch(self, handle, rows):
        return rows  # the route's Pending ran both hops

    def _measure_chunk_rows(self, x, topk_idx, topk_weights, fp8: bool) -> None:
        """Times a forward dispatch + combine of these very rows at a few chunk sizes (the slowest rank's time,
        best of 2) and keeps the fastest; every rank of the EP group takes the same choice."""
        group = self.topo.groups["ep"]
        in_node = self.layout(topk_idx)[2].view(-1, self.n_nodes, self.ranks_per_ep_node).any(-1)
        most = torch.tensor([int(in_node.sum(0).max()) if in_node.numel() else 0])
        if group is not None:
            dist.all_reduce(most, dist.ReduceOp.MAX, group=group)
        sizes = sorted({max(1, math.ceil(int(most) / f)) for f in self.CHUNK_FRACTIONS})
        saved = dict(self.stats.counts)
        for size in sizes:
            self.chunk_rows = size
            best = math.inf
            for _ in range(2):
                if group is not None:
                    dist.barrier(group=group)
                t0 = time.perf_counter()
                with torch.no_grad():
                    recv_x, _, _, handle = super().dispatch_async(x, topk_idx, topk_weights, fp8).wait()
                    self.combine(recv_x, handle)
                best = min(best, time.perf_counter() - t0)
            t = torch.tensor([best], dtype=torch.float64)
            if group is not None:
                dist.all_reduce(t, dist.ReduceOp.MAX, group=group)
            self.tuning[size] = float(t)
        self.stats.counts = saved  # the measurement's traffic and waits are not the model's
        self.stats.take_wait()
        self.chunk_rows = min(sizes, key=lambda c: (self.tuning[c], c))
        log.info("two_hop_chunked dispatch: chunk_rows = %d, measured (rows: ms, slowest rank) %s", self.chunk_rows,
                 ", ".join(f"{c}: {self.tuning[c] * 1e3:.1f}" for c in sizes))


def make_dispatcher(kind: str, topo: Topology, chunk_rows: int | None = None) -> Dispatcher:
    """kind: flat, two_hop or two_hop_chunked (chunk_rows: rows per chunk, None = measured at the start)."""
    kinds = {c.kind: c for c in (FlatDispatcher, TwoHopDispatcher, ChunkedTwoHopDispatcher)}
    if kind not in kinds:
        raise ValueError(f"parallel.dispatcher = {kind!r}: choose one of {', '.join(map(repr, kinds))}")
    if kind == ChunkedTwoHopDispatcher.kind:
        return ChunkedTwoHopDispatcher(topo, chunk_rows)
    return kinds[kind](topo)
