"""Row transport: variable-size all-to-all hops, their reverse with a fixed-order reduction, and the
byte counters per link class.

A `Hop` moves rows of a stage (tokens, or rows received by an earlier hop) to the peers of one
process group: `gather` lists, peer by peer, which rows go where. Its reverse sends rows back along the
same paths and sums the copies of each row. A `Route` is one or more hops plus a final permutation;
dispatch runs it forward, combine runs it in reverse.

Determinism: the reverse sums a row's copies peer by peer in ascending order, as a left fold
((0 + a) + b) + ... with one `index_add_` per peer (the indices inside one call are distinct, so no
two additions race, on CPU or GPU). Peers can be folded in groups (partial sum per group, then the
groups in order); the flat dispatcher groups the EP ranks by node, which makes its sums bit-identical
to the two-hop dispatcher's (partial sums inside the destination node, then the nodes in order).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

LINKS = ("inter_node", "intra_node")


@dataclass
class LinkStats:
    """Bytes and rows this rank sent, per link class; only hidden-state rows are counted (the routing
    metadata, K ids and K weights per row, is small and left out, as in DeepEP's bandwidth figures).
    Copies to this rank itself cross no link and are not counted. Also the seconds spent waiting for transfers to
    land (`waited`). Thread-safe: DualPipeV's overlapped pairs count from two threads."""

    counts: dict = field(default_factory=lambda: {f"{k}_{u}": 0 for k in LINKS for u in ("bytes", "rows")})
    wait_s: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, link: str, rows: int, row_bytes: int) -> None:
        if link in LINKS and rows:
            with self._lock:
                self.counts[f"{link}_bytes"] += rows * row_bytes
                self.counts[f"{link}_rows"] += rows

    def waited(self, pending: Pending) -> list[torch.Tensor]:
        """`pending.wait()`, its time counted in `wait_s` (the receive side's fold included)."""
        start = time.perf_counter()
        out = pending.wait()
        with self._lock:
            self.wait_s += time.perf_counter() - start
        return out

    def take_wait(self) -> float:
        """The wait seconds so far, starting again from zero."""
        with self._lock:
            out, self.wait_s = self.wait_s, 0.0
        return out

    def reset(self) -> dict:
        """Returns the counts so far and starts again from zero."""
        out, self.counts = dict(self.counts), {k: 0 for k in self.counts}
        return out


def exchange_counts(send: list[int], group, device) -> list[int]:
    """Each peer learns how many rows it will receive from each other peer (a blocking exchange, as
    DeepEP's notify step: receive buffers need their sizes)."""
    if group is None:
        return list(send)
    t = torch.tensor(send, dtype=torch.int64, device=device)
    out = torch.empty_like(t)
    dist.all_to_all_single(out, t, group=group)
    return out.tolist()


class Pending:
    """Rows in flight: `wait()` returns them once every transfer has landed (and folds them if the
    transfer was a reverse hop)."""

    def __init__(self, works, outputs, finish=None):
        self.works, self.outputs, self.finish = works, outputs, finish

    def wait(self) -> list[torch.Tensor]:
        for w in self.works:
            w.wait()
        self.works = []
        return self.finish(self.outputs) if self.finish else self.outputs


@dataclass
class Hop:
    # ProcessGroup of the forward lane and of the backward lane (the same group unless the topology has a backward
    # lane, topology.py), or (None, None) when the only peer is this rank (a local gather)
    groups: tuple
    links: list[str]  # link class to each peer: "local", "intra_node" or "inter_node"
    gather: torch.Tensor  # [S] int64: rows of the previous stage, in send order (peer-major)
    send_splits: list[int]  # rows to each peer
    recv_splits: list[int]  # rows from each peer
    n_in: int  # rows of the previous stage
    fold_groups: list[list[int]]  # peers whose copies are summed first, group by group, in order

    def _count(self, stats: LinkStats | None, splits: list[int], row: torch.Tensor) -> None:
        if stats is None:
            return
        row_bytes = math.prod(row.shape[1:]) * row.element_size()
        for link, n in zip(self.links, splits):
            stats.add(link, n, row_bytes)

    @property
    def is_identity(self) -> bool:
        """A local hop that keeps every row in place (e.g. the intra-node hop with one rank per node)."""
        if self.groups[0] is not None or self.gather.numel() != self.n_in:
            return False
        return bool((self.gather == torch.arange(self.n_in, device=self.gather.device)).all())

    def forward(self, tensors: list[torch.Tensor], stats: LinkStats | None, alias: bool = False,
                backward: bool = False) -> Pending:
        """Copies rows to their peers (asynchronously); the first tensor is the counted one.
        alias: an identity hop may return its inputs themselves (only for internal stages).
        backward: issued by backward computation (it runs on the backward lane's group)."""
        if alias and self.is_identity:
            return Pending([], list(tensors))
        send = [t.index_select(0, self.gather) for t in tensors]
        if self.groups[0] is None:
            return Pending([], send)
        self._count(stats, self.send_splits, send[0])
        return self._all_to_all(send, self.recv_splits, self.send_splits, self.groups[backward])

    def reverse(self, tensors: list[torch.Tensor], stats: LinkStats | None, alias: bool = False,
                backward: bool = False) -> Pending:
        """Sends received rows back to where they came from (asynchronously), then sums the copies."""
        if alias and self.is_identity:
            return Pending([], list(tensors))
        if self.groups[0] is None:
            return Pending([], [t.contiguous() for t in tensors], self._fold_all)
        self._count(stats, self.recv_splits, tensors[0])
        return self._all_to_all(tensors, self.send_splits, self.recv_splits, self.groups[backward],
                                finish=self._fold_all)

    def _all_to_all(self, tensors: list[torch.Tensor], out_splits: list[int], in_splits: list[int], group,
                    finish=None) -> Pending:
        """One asynchronous all_to_all_single per tensor over `group`."""
        outs, works = [], []
        for t in tensors:
            out = t.new_empty((sum(out_splits),) + tuple(t.shape[1:]))
            works.append(dist.all_to_all_single(out, t.contiguous(), out_splits, in_splits, group=group,
                                                async_op=True))
            outs.append(out)
        return Pending(works, outs, finish)

    def _fold_all(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self._fold(o) for o in outs]

    def _fold(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [S, ...] in send order -> [n_in, ...]: each previous-stage row's copies summed in order."""
        out = rows.new_zeros((self.n_in,) + tuple(rows.shape[1:]))
        chunks, idx = rows.split(self.send_splits), self.gather.split(self.send_splits)
        for peers in self.fold_groups:
            peers = [p for p in peers if self.send_splits[p]]
            if len(peers) == 1:
                out.index_add_(0, idx[peers[0]], chunks[peers[0]])
            elif peers:
                part = rows.new_zeros(out.shape)
                for p in peers:
                    part.index_add_(0, idx[p], chunks[p])
                touched = torch.cat([idx[p] for p in peers]).unique()  # sorted
                out.index_add_(0, touched, part.index_select(0, touched))
        return out


@dataclass
class Route:
    """Hops in order; the first one is the asynchronous one that the caller's work overlaps.
    Final rows = rows after the last hop, permuted by `perm` (None: as received)."""

    hops: list[Hop]
    perm: torch.Tensor | None = None

    # backward: the call comes from backward computation (the backward lane's groups, topology.py)
    def forward_start(self, tensors, stats, backward: bool = False) -> Pending:
        return self.hops[0].forward(tensors, stats, backward=backward)

    def forward_rest(self, rows, stats, backward: bool = False) -> list[torch.Tensor]:
        for hop in self.hops[1:]:
            rows = hop.forward(rows, stats, alias=True, backward=backward).wait()
        if self.perm is not None:
            rows = [r.index_select(0, self.perm) for r in rows]
        return rows

    def reverse_start(self, rows, stats, backward: bool = False) -> Pending:
        if self.perm is not None:
            rows = [torch.empty_like(r).index_copy_(0, self.perm, r) for r in rows]
        for hop in reversed(self.hops[1:]):
            rows = hop.reverse(rows, stats, alias=True, backward=backward).wait()
        return self.hops[0].reverse(rows, stats, backward=backward)
