"""The two-hop route in chunks, pipelined (report §3.2.2: tokens forwarded over NVLink "without being
blocked by subsequently arriving tokens").

Three roles, every rank playing all three inside its EP group (L ranks per node, N nodes):
  source     sends the rows bound for node n to the rank at its own local index there (the IB hop), in
             chunks of `chunk_rows` rows, each chunk its own asynchronous send;
  forwarder  takes the chunks in a fixed interleaved order (chunk 0 of every source node, then chunk 1...)
             and forwards each one inside its node (the NVLink hop) as soon as it has landed, while the
             later chunks are still on the wire; no barrier between the hops;
  receiver   collects the forwarded pieces and puts its rows in the order of the unchunked dispatcher
             (source position, then source token): a stable sort on the source position.
The first forward pass learns the route: each forwarded piece is preceded by a one-number header (its row
count) because only the forwarder knows, once the chunk is there, which of its rows go to which peer. Later
passes over the same route (combine, and the backward passes) know every size and send no headers.

The reverse (combine) mirrors it: receivers send each piece back, the forwarder sums a chunk's copies as
soon as they have all landed (peers in ascending order, one index_add_ each, as the unchunked hop does)
and sends one row per token back over IB; the source sums the nodes in ascending order. Every element sees
the additions of the unchunked dispatcher in the same order, so results are bit-identical to it.

Rows travel as bytes (all tensors of a row side by side), so any dtypes ride in one message per piece.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from sourcelm.parallel.transport import LinkStats, Pending, exchange_counts


def _pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[rows, ...] tensors -> uint8 [rows, their bytes side by side]."""
    return torch.cat([t.contiguous().reshape(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8) for t in tensors],
                     dim=1)


def _unpack(buf: torch.Tensor, like: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    out, col = [], 0
    for shape, dtype in like:
        width = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        part = buf[:, col:col + width].clone(memory_format=torch.contiguous_format)  # aligned for the view
        out.append(part.view(dtype).reshape((buf.shape[0],) + tuple(shape)))
        col += width
    return out


def _row_bytes(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


class ChunkedTwoHopRoute:
    """One dispatch's route (built by the first forward pass) and its passes; the Route interface of
    transport.py: forward_start / forward_rest / reverse_start."""

    def __init__(self, d, in_node: torch.Tensor, chunk_rows: int):
        topo = d.topo
        self.d, self.c = d, chunk_rows
        self.n_tokens, self.n_nodes, self.el = in_node.shape[0], d.n_nodes, d.ranks_per_ep_node
        self.me_node, self.me_local = topo.ep_node, topo.ep_local_rank
        self.inter, self.intra = topo.members["ep_inter"], topo.members["ep_intra"]
        # (inter, intra) groups per lane: forward, backward (topology.py's backward lane; the same groups without one)
        self.lanes = ((topo.group("ep_inter"), topo.group("ep_intra")),
                      (topo.group("ep_inter", True), topo.group("ep_intra", True)))
        g_inter, g_intra = self.lanes[0]  # the route is built by a forward dispatch
        self.src_of = [n * self.el + self.me_local for n in range(self.n_nodes)]  # EP position of my source peers
        # source side: the rows for node n, in token order, and their chunks
        self.gather = [in_node[:, n].nonzero().flatten() for n in range(self.n_nodes)]
        self.send = [g.numel() for g in self.gather]
        self.recv = exchange_counts(self.send, g_inter if self.n_nodes > 1 else None, in_node.device)
        # forwarder side: every forwarder's chunk counts per source node, known to its peers
        counts = torch.tensor(self.recv, dtype=torch.int64)
        if self.el > 1:
            every = [torch.empty_like(counts) for _ in range(self.el)]
            dist.all_gather(every, counts, group=g_intra)
            counts = torch.stack(every)
        else:
            counts = counts[None]
        self.order = [self._order(counts[f].tolist()) for f in range(self.el)]  # (source node, chunk, rows)
        self.fwd_gather: list[list[torch.Tensor]] | None = None  # my pieces: rows of the chunk per peer
        self.piece_rows: list[list[int]] | None = None  # rows I receive from forwarder f, per piece
        self.perm: torch.Tensor | None = None

    def _order(self, recv: list[int]) -> list[tuple[int, int, int]]:
        """A forwarder's pieces: chunk k of every source node, then chunk k + 1 (arrival order when the
        sources send at the same pace)."""
        chunks = [[min(self.c, r - k * self.c) for k in range(math.ceil(r / self.c))] for r in recv]
        out = []
        for k in range(max((len(c) for c in chunks), default=0)):
            out += [(s, k, chunks[s][k]) for s in range(self.n_nodes) if k < len(chunks[s])]
        return out

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        return [(k * self.c, min(self.c, self.send[n] - k * self.c)) for k in range(math.ceil(self.send[n] / self.c))]

    def _stats(self, stats: LinkStats | None, link: str, rows: int, row_bytes: int) -> None:
        if stats is not None:
            stats.add(link, rows, row_bytes)

    # ---------------------------------------------------------------- forward (dispatch)
    def forward_start(self, tensors: list[torch.Tensor], stats: LinkStats | None, backward: bool = False) -> Pending:
        """Posts every IB-hop send and receive; the returned Pending forwards and collects on wait().
        backward: issued by backward computation (the backward lane's groups)."""
        g_inter, g_intra = self.lanes[backward]
        like = [(tuple(t.shape[1:]), t.dtype) for t in tensors]
        rb = _row_bytes(tensors[0])
        mine: dict[tuple[int, int], torch.Tensor] = {}  # (source node, chunk) -> packed rows
        works = []
        for n in range(self.n_nodes):
            rows = _pack([t.index_select(0, self.gather[n]) for t in tensors])
            for k, (start, size) in enumerate(self._chunks(n)):
                piece = rows[start:start + size]
                if n == self.me_node:
                    mine[(n, k)] = piece
                else:
                    self._stats(stats, "inter_node", size, rb)
                    works.append(dist.isend(piece, self.inter[n], group=g_inter, tag=k))
        arriving = {}
        width = sum(math.prod(s) * torch.empty((), dtype=dt).element_size() for s, dt in like)
        for s, k, size in self.order[self.me_local]:
            if s != self.me_node:
                buf = tensors[0].new_empty((size, width), dtype=torch.uint8)
                arriving[(s, k)] = (buf, dist.irecv(buf, self.inter[s], group=g_inter, tag=k))
        headers = None
        if self.fwd_gather is None:  # first pass: row counts come as headers, posted now
            headers = {f: [(h := torch.empty(1, dtype=torch.int64), dist.irecv(h, self.intra[f], group=g_intra,
                                                                               tag=2 * i))
                           for i in range(len(self.order[f]))] for f in range(self.el) if f != self.me_local}
        return Pending([], [t.new_empty((0,) + s, dtype=dt) for t, (s, dt) in zip(tensors, like)],
                       lambda _: self._forward_finish(mine, arriving, headers, works, like, width, rb, stats, g_intra))

    def _forward_finish(self, mine, arriving, headers, works, like, width, rb, stats, g_intra) -> list[torch.Tensor]:
        learn = self.fwd_gather is None
        if learn:
            self.fwd_gather = []
            self.piece_rows = [[0] * len(self.order[f]) for f in range(self.el)]
        got = {f: [None] * len(self.order[f]) for f in range(self.el)}  # per forwarder: packed rows per piece
        pending = {f: [] for f in range(self.el)}  # posted payload receives: (piece, buf, work)
        seen = {f: 0 for f in range(self.el)}  # headers handled so far

        def post_payloads(block: bool) -> None:
            for f in range(self.el):
                if f == self.me_local:
                    continue
                while seen[f] < len(self.order[f]):
                    i = seen[f]
                    if learn:
                        h, w = headers[f][i]
                        if not block and not w.is_completed():
                            break
                        w.wait()
                        self.piece_rows[f][i] = int(h.item())
                    rows = self.piece_rows[f][i]
                    if rows:
                        buf = torch.empty((rows, width), dtype=torch.uint8)
                        pending[f].append((i, buf, dist.irecv(buf, self.intra[f], group=g_intra, tag=2 * i + 1)))
                    else:
                        got[f][i] = torch.empty((0, width), dtype=torch.uint8)
                    seen[f] += 1

        for i, (s, k, _) in enumerate(self.order[self.me_local]):
            if s == self.me_node:
                chunk = mine[(s, k)]
            else:
                chunk, w = arriving[(s, k)]
                w.wait()
            if learn:
                self.fwd_gather.append(self._peer_rows(_unpack(chunk, like)[2]))
            for q, idx in enumerate(self.fwd_gather[i]):
                rows = chunk.index_select(0, idx)
                if q == self.me_local:
                    got[q][i] = rows
                    if learn:
                        self.piece_rows[q][i] = rows.shape[0]
                    continue
                if learn:
                    works.append(dist.isend(torch.tensor([rows.shape[0]]), self.intra[q], group=g_intra,
                                            tag=2 * i))
                if rows.shape[0]:
                    self._stats(stats, "intra_node", rows.shape[0], rb)
                    works.append(dist.isend(rows, self.intra[q], group=g_intra, tag=2 * i + 1))
            post_payloads(block=False)
        post_payloads(block=True)
        for f in range(self.el):
            for i, buf, w in pending[f]:
                w.wait()
                got[f][i] = buf
        for w in works:
            w.wait()
        # pieces in (forwarder, piece) order; the source position of each row orders them
        pieces = [torch.empty((0, width), dtype=torch.uint8)] + [p for f in range(self.el) for p in got[f]]
        out = _unpack(torch.cat(pieces), like)
        if learn:
            src = torch.cat([torch.empty(0, dtype=torch.int64)] +
                            [torch.full((rows,), self.order[f][i][0] * self.el + f, dtype=torch.int64)
                             for f in range(self.el) for i, rows in enumerate(self.piece_rows[f])])
            self.perm = src.argsort(stable=True)
        return [t.index_select(0, self.perm) for t in out]

    def _peer_rows(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """For a chunk's global expert ids [rows, K]: the rows each local peer holds an expert of."""
        d = self.d
        valid = idx >= 0
        rank_of = torch.where(valid, idx // d.e_local, torch.full_like(idx, -1))
        here = valid & (rank_of // self.el == self.me_node)
        return [(here & (rank_of % self.el == q)).any(1).nonzero().flatten() for q in range(self.el)]

    def forward_rest(self, rows: list[torch.Tensor], stats, backward: bool = False) -> list[torch.Tensor]:
        return rows  # the Pending of forward_start did both hops

    # ---------------------------------------------------------------- reverse (combine)
    def reverse_start(self, rows: list[torch.Tensor], stats: LinkStats | None, backward: bool = False) -> Pending:
        """Sends every received piece back to its forwarder; wait() sums inside the node, crosses back
        chunk by chunk and sums the nodes in order."""
        g_inter, g_intra = self.lanes[backward]
        like = [(tuple(t.shape[1:]), t.dtype) for t in rows]
        rb = _row_bytes(rows[0])
        pre = _pack([torch.empty_like(t).index_copy_(0, self.perm, t) for t in rows])  # (forwarder, piece) order
        sizes = [r for f in range(self.el) for r in self.piece_rows[f]]
        parts = iter(pre.split(sizes))
        back, works = {}, []
        for f in range(self.el):
            for i, r in enumerate(self.piece_rows[f]):
                part = next(parts)
                if f == self.me_local:
                    back[i] = part
                elif r:
                    self._stats(stats, "intra_node", r, rb)
                    works.append(dist.isend(part, self.intra[f], group=g_intra, tag=2 * i + 1))
        width = pre.shape[1]
        posted = []  # my pieces as forwarder: per peer, (buf, work) or the local rows
        for i, idx in enumerate(self.fwd_gather):
            per_peer = []
            for q, g in enumerate(idx):
                if q == self.me_local or not g.numel():
                    per_peer.append((back.get(i) if q == self.me_local else None, None))
                else:
                    buf = pre.new_empty((g.numel(), width))
                    per_peer.append((buf, dist.irecv(buf, self.intra[q], group=g_intra, tag=2 * i + 1)))
            posted.append(per_peer)
        home = {}
        for n in range(self.n_nodes):
            for k, (_, size) in enumerate(self._chunks(n)):
                if n != self.me_node:
                    buf = pre.new_empty((size, width))
                    home[(n, k)] = (buf, dist.irecv(buf, self.inter[n], group=g_inter, tag=k))
        return Pending([], [t.new_empty((0,) + s, dtype=dt) for t, (s, dt) in zip(rows, like)],
                       lambda _: self._reverse_finish(posted, home, works, like, rb, stats, g_inter))

    def _reverse_finish(self, posted, home, works, like, rb, stats, g_inter) -> list[torch.Tensor]:
        for i, (s, k, size) in enumerate(self.order[self.me_local]):
            if self.el == 1:  # the unchunked hop 2 is then an identity and sums nothing
                partial = _unpack(posted[i][0][0], like)
            else:
                partial = [torch.zeros((size,) + shape, dtype=dt) for shape, dt in like]
            # peers in ascending order, as the unchunked fold
            for q, (buf, w) in enumerate(posted[i] if self.el > 1 else []):
                if buf is None or not self.fwd_gather[i][q].numel():
                    continue
                if w is not None:
                    w.wait()
                for p, t in zip(partial, _unpack(buf, like)):
                    p.index_add_(0, self.fwd_gather[i][q], t)
            packed = _pack(partial)
            if s == self.me_node:
                home[(s, k)] = (packed, None)
            else:
                self._stats(stats, "inter_node", size, rb)
                works.append(dist.isend(packed, self.inter[s], group=g_inter, tag=k))
        out = [torch.zeros((self.n_tokens,) + shape, dtype=dt) for shape, dt in like]
        for n in range(self.n_nodes):  # nodes in ascending order, as the unchunked fold
            chunks = []
            for k in range(len(self._chunks(n))):
                buf, w = home[(n, k)]
                if w is not None:
                    w.wait()
                chunks.append(buf)
            if chunks:
                for o, t in zip(out, _unpack(torch.cat(chunks), like)):
                    o.index_add_(0, self.gather[n], t)
        for w in works:
            w.wait()
        return out
