"""Vectorised connected components vs the textbook union-find and a BFS reference."""

from collections import defaultdict, deque

import numpy as np
import pytest

from sourcelm.data.dedup.union_find import UnionFind, connected_components, duplicates_mask


def bfs_labels(n, u, v):
    adj = defaultdict(list)
    for a, b in zip(u.tolist(), v.tolist()):
        adj[a].append(b)
        adj[b].append(a)
    labels = [-1] * n
    for start in range(n):  # ascending, so each component is labelled by its smallest node
        if labels[start] >= 0:
            continue
        labels[start] = start
        queue = deque([start])
        while queue:
            x = queue.popleft()
            for y in adj[x]:
                if labels[y] < 0:
                    labels[y] = start
                    queue.append(y)
    return np.array(labels)


@pytest.mark.parametrize("n,m,seed", [(1, 0, 0), (50, 0, 1), (200, 150, 2), (2000, 1900, 3), (3000, 6000, 4)])
def test_random_graphs_match_bfs_and_union_find(n, m, seed):
    rng = np.random.default_rng(seed)
    u, v = rng.integers(0, n, m), rng.integers(0, n, m)
    expected = bfs_labels(n, u, v)
    np.testing.assert_array_equal(connected_components(n, u, v), expected)
    uf = UnionFind(n)
    for a, b in zip(u.tolist(), v.tolist()):
        uf.union(a, b)
    np.testing.assert_array_equal(uf.labels(), expected)


def test_adversarial_shapes_reverse_chain_and_star():
    n = 5000
    chain = np.arange(n - 1, 0, -1)  # edges (n-1, n-2), ..., (1, 0): the worst order for naive hooking
    labels = connected_components(n, chain, chain - 1)
    assert (labels == 0).all()
    star_u = np.full(n - 1, n - 1)  # everything joins the largest index first
    labels = connected_components(n, star_u, np.arange(n - 1))
    assert (labels == 0).all()
    assert duplicates_mask(labels).sum() == n - 1


def test_labels_do_not_depend_on_edge_order():
    rng = np.random.default_rng(7)
    u, v = rng.integers(0, 500, 400), rng.integers(0, 500, 400)
    perm = rng.permutation(400)
    a = connected_components(500, u, v)
    b = connected_components(500, v[perm], u[perm])
    np.testing.assert_array_equal(a, b)


def test_rejects_out_of_range_edges():
    with pytest.raises(ValueError, match="outside"):
        connected_components(3, np.array([0]), np.array([3]))
