"""Clustering duplicate candidates: union-find, in a classic and a vectorised form.

Near-dedup ends with a graph: one node per document, one edge per pair of documents that share
a MinHash band. Its connected components are the duplicate clusters. Every anchor spends most of
its dedup time here, because it walks the edges one at a time in Python.

`connected_components` does the same work with whole-array numpy operations: each round hooks
every edge's larger root under its smaller root (`np.minimum.at`), then compresses all paths by
pointer jumping (`parent = parent[parent]`) until every node points at its root. Since a parent
is never larger than its child, no cycle can form, and the root of a component is always its
smallest node index: that is the document the dedup keeps, so the choice is deterministic and
independent of edge order or worker count.

`UnionFind` is the textbook structure (path halving + union by size) kept as the reference the
vectorised version is tested against, and for callers that add edges one at a time.
"""

from __future__ import annotations

import numpy as np


class UnionFind:
    """Disjoint sets over 0..n-1 with path halving and union by size."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))
        self.size = [1] * n

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving: every other node skips a level
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        """Merges the sets of a and b; returns the new root."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if self.size[ra] < self.size[rb]:  # the smaller tree goes under the larger: depth stays O(log n)
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]
        return ra

    def labels(self) -> np.ndarray:
        """For each node, the smallest node index of its set (a canonical label, independent of the
        order of unions)."""
        n = len(self.parent)
        roots = np.fromiter((self.find(i) for i in range(n)), dtype=np.int64, count=n)
        smallest = np.full(n, n, dtype=np.int64)
        np.minimum.at(smallest, roots, np.arange(n, dtype=np.int64))
        return smallest[roots]


def _compress(parent: np.ndarray) -> np.ndarray:
    """Pointer jumping until every node points at a root: O(log depth) whole-array passes."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def connected_components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Component label of each of n nodes given edges (u[i], v[i]); the label is the smallest node
    index in the component. Vectorised hook-and-compress (Shiloach-Vishkin style)."""
    parent = np.arange(n, dtype=np.int64)
    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    if u.shape != v.shape:
        raise ValueError(f"edge arrays differ in shape: {u.shape} vs {v.shape}")
    if u.size and (min(u.min(), v.min()) < 0 or max(u.max(), v.max()) >= n):
        raise ValueError(f"edge endpoint outside 0..{n - 1}")
    while u.size:
        ru, rv = parent[u], parent[v]
        live = ru != rv
        if not live.any():
            break
        # edges whose ends are already in one component never matter again: drop them
        u, v, ru, rv = u[live], v[live], ru[live], rv[live]
        lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
        # hook: each root `hi` goes under the smallest root it touches (roots only ever decrease)
        np.minimum.at(parent, hi, lo)
        parent = _compress(parent)
    return parent


def duplicates_mask(labels: np.ndarray) -> np.ndarray:
    """True for every node that is not the representative (smallest index) of its component."""
    return labels != np.arange(labels.size, dtype=labels.dtype)
