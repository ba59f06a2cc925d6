"""Pipeline parallelism, the pure part: how the layers are cut into chunks, which rank holds which chunk, and the
order in which each rank runs its forward (F) and backward (B) chunks under 1F1B and DualPipeV.

Chunks. The model's main layers are cut into `n_chunks` contiguous ranges: P chunks under 1F1B (stage s holds chunk
s), 2P under DualPipeV (report §3.2.1; the "cut-in-half" DualPipe): rank r holds chunk r and chunk 2P-1-r, a V, so rank
0 holds both the first chunk (the embedding) and the last (final norm, head, MTP) and the MTP module shares the
embedding and the head with the main model on one rank, as the report requires. The cut balances compute: each main
layer costs its forward FLOPs per token (attention, and the dense FFN or the activated experts and router), the first
chunk also the embedding lookup (free), the last chunk the head and every MTP depth (a block, `eh_proj` and the head
again); every chunk keeps at least one main layer. Under 1F1B the cut minimises the largest chunk's cost; under
DualPipeV, where a rank runs both its chunks for every micro-batch, the largest rank's (its two chunks together),
then it makes the chunks as even as it can. Cutting chunks alone can leave one rank a chunk's worth busier than the
others (DeepSeek-V3 at P 16: rank 0 held 1.7x the mean rank, now 1.46x, its floor; `partition_layers`).

Schedules (`schedule`): the list of (kind, chunk, micro-batch) a rank runs, in order. Sends are asynchronous and a
receive waits for its sender, so a list is runnable when every op's inputs were produced earlier on their ranks.
- 1F1B: stage s runs min(P-s-1, M) forwards, then alternates F and B, then the remaining backwards (no W split).
- DualPipeV (DeepSeek's dualpipev.py, eight phases; phase 0 = chunk r, phase 1 = chunk 2P-1-r): F0 x 2(P-r-1);
  (F0, F1) x (r+1); (B1, W, F1) x (P-r-1); (F0&B1, F1&B0) x (M-2P+r+1); (B1, F1&B0) x (P-r-1); (B1, B0) x (r+1);
  (W, B0) x (P-r-1); W x (r+1). The F of each F&B pair is marked `paired`: the executor runs it at the same time
  as the B after it (each on its own process groups), so that one's communication hides behind the other's compute
  (report Figure 4). The zero-bubble W split (`zero_bubble`, the default): the B's of phase 3, of the second half
  of phase 6 (the last r+1 of its 2(r+1) B's) and of phase 7 compute input gradients only and are marked
  `defer_w`; each W op runs the weight gradients of the oldest such B not yet run (first in, first out; the op
  names its chunk and micro-batch), so the bubble is Table 2's (PP/2-1)(F&B+B-3W). Without the split the W ops
  are left out and every B computes both (the bubble with W = 0).

Who defines what: `schedule` is the one definition of the orders the trainer runs. The one simulator of them is the
planner's (`sourcelm.plan.pipeline_sim`, which also holds the ZB1P and DualPipe orders the trainer does not run): it
builds its 1F1B and DualPipeV from `schedule`, and the tests check them there (no deadlock, every micro-batch's F
and B exactly once per chunk, each W after its B, the idle time against Table 2). This package does not import the
planner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sourcelm.config import ConfigError, ModelConfig

SCHEDULES = ("1f1b", "dualpipev")


@dataclass(frozen=True)
class Op:
    kind: str  # "F", "B" or "W" (the weight gradients a `defer_w` B left)
    chunk: int
    micro_batch: int
    # an F that runs at the same time as the op after it (a B of the rank's other chunk): DualPipe's F&B pair.
    # Not part of the op's identity (equality, hashing), nor is defer_w: they say how the op runs, not which op it is.
    paired: bool = field(default=False, compare=False)
    # a B that computes input gradients only, its weight gradients left for the W op of the same chunk and micro-batch
    defer_w: bool = field(default=False, compare=False)


def n_chunks(pp: int, schedule: str) -> int:
    return 2 * pp if schedule == "dualpipev" else pp


def chunk_rank(chunk: int, pp: int, schedule: str) -> int:
    """The pipeline rank (stage index) holding `chunk`."""
    if schedule == "dualpipev":
        return chunk if chunk < pp else 2 * pp - 1 - chunk
    return chunk


def rank_chunks(rank: int, pp: int, schedule: str) -> list[int]:
    return [rank, 2 * pp - 1 - rank] if schedule == "dualpipev" else [rank]


def min_micro_batches(pp: int, schedule: str) -> int:
    """The fewest micro-batches a step may have: 2P under DualPipeV (its phases assume it); 1F1B runs any count,
    but with fewer than P the pipeline never fills, so P is required."""
    return 2 * pp if schedule == "dualpipev" else pp


# ------------------------------------------------------------------------------------------------ partition

def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float]:
    """Forward FLOPs per token of each main layer, and of the last chunk's extra work (head and MTP)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    q = h * heads * cfg.qk_head_dim if cfg.q_lora_rank is None else cfg.q_lora_rank * (h + heads * cfg.qk_head_dim)
    kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim
                                                                                        + cfg.v_head_dim)
    attention = 2 * (q + kv + heads * cfg.v_head_dim * h) + 2 * heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    dense = 2 * 3 * h * cfg.intermediate_size
    moe = (2 * 3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
           + 2 * h * cfg.n_routed_experts)
    costs = [attention + (moe if cfg.is_moe_layer(i) else dense) for i in range(cfg.num_hidden_layers)]
    head = 2 * h * cfg.vocab_size
    mtp_layer = attention + (moe if cfg.is_moe_layer(cfg.num_hidden_layers) else dense)
    tail = head + cfg.num_nextn_predict_layers * (mtp_layer + 2 * 2 * h * h + head)
    return costs, tail


def partition_layers(cfg: ModelConfig, pp: int, schedule: str, seq_len: int,
                     counts: list[int] | None = None) -> list[range]:
    """Contiguous ranges of main layers, one per chunk (`n_chunks`): `counts` layers each where given
    (parallel.pp_layers, checked by the config), else the cut that balances compute (`layer_costs`, the tail on the
    last chunk; every chunk at least one layer). Under 1F1B a rank runs one chunk: the cut minimises the largest
    chunk's cost. Under DualPipeV a rank runs chunks r and 2P-1-r for every micro-batch, so its steady phase lasts
    as long as its two chunks together: the cut minimises the largest rank's cost, and among those cuts makes the
    chunks as even as it can (`_v_cut`)."""
    chunks = n_chunks(pp, schedule)
    if counts:
        bounds = [sum(counts[:k]) for k in range(len(counts) + 1)]
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]
    costs, tail = layer_costs(cfg, seq_len)
    if chunks > len(costs):
        raise ConfigError(f"{chunks} pipeline chunks need at least {chunks} main layers; model.num_hidden_layers = "
                          f"{len(costs)}: lower parallel.pp (DualPipeV cuts 2 x pp chunks) or add layers")
    bounds = balanced_cut([round(c) for c in costs], round(tail), pp, schedule)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def balanced_cut(costs: list[int], tail: int, pp: int, schedule: str) -> list[int]:
    """The chunk bounds [0, .., len(costs)] of `partition_layers`' cut, given each layer's cost and the last
    chunk's tail (integer FLOPs, so that cuts of equal cost compare equal)."""
    bounds = _chunk_cut(costs, tail, n_chunks(pp, schedule))
    if schedule == "dualpipev":
        bounds = _v_cut(costs, tail, pp, max(rank_costs(costs, tail, bounds, pp, schedule)))
    return bounds


def _chunk_cut(costs: list[int], tail: int, chunks: int) -> list[int]:
    """Chunk bounds minimising the largest chunk's cost; ties go to the cut that puts fewer layers late (the last
    chunk already carries the head)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: the smallest largest-cost of cutting layers [0, i) into k chunks; cut[k][i]: where chunk k starts
    best = [[inf] * (n + 1) for _ in range(chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(chunks + 1)]
    best[0][0] = 0
    for k in range(1, chunks + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = prefix[i] - prefix[j] + (tail if k == chunks and i == n else 0)
                value = max(best[k - 1][j], cost)
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [n], n
    for k in range(chunks, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return bounds[::-1]


def rank_costs(costs: list[float], tail: float, bounds: list[int], pp: int, schedule: str) -> list[float]:
    """Each pipeline rank's cost under a cut: its chunk's, or under DualPipeV its two chunks' together."""
    chunk = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    chunk[-1] += tail
    return [sum(chunk[c] for c in rank_chunks(r, pp, schedule)) for r in range(pp)]


def _v_cut(costs: list[int], tail: int, pp: int, bound: int) -> list[int]:
    """DualPipeV's cut: the smallest largest rank cost (a rank's two chunks together), and among the cuts that
    reach it the most even chunks (the smallest sum of squared chunk costs). Even chunks matter once one rank's
    cost is fixed by the head: rank 0 holds the last chunk, so the others could otherwise take any cut below it.
    `bound`, the largest rank cost of a known cut, limits the search."""
    best_rank = _v_search(costs, tail, pp, bound, even=False)[0]
    return _v_search(costs, tail, pp, best_rank, even=True)[1]


def _v_search(costs: list[int], tail: int, pp: int, bound: float, even: bool) -> tuple[float, list[int]]:
    """The V cut from the outside in, every rank costing at most `bound`: at depth d < P-1, rank d takes chunk
    d = [i, i + a) from the left of the layers left, [i, j), and chunk 2P-1-d = [j - b, j) from their right; the
    innermost rank takes the rest as two chunks. The state after a depth is (i, j), holding the best value of the
    depths so far: the largest rank cost (even=False), or the sum of squared chunk costs (even=True). Returns the
    best value and its chunk bounds. No chunk costs more than `bound`, which limits the lengths a and b tried."""
    n, inf = len(costs), float("inf")
    s = np.concatenate([[0], np.cumsum(costs)]).astype(np.float64)  # integers below 2**53: exact
    run_min = [0.0] + [float((s[a:] - s[:-a]).min()) for a in range(1, n + 1)]  # the cheapest run of a layers
    lengths = [a for a in range(1, n + 1) if run_min[a] <= bound]
    value = np.full((n + 1, n + 1), inf)
    value[0, n] = 0.0
    steps = []  # per depth: the (a, b) that reached each state
    for d in range(pp - 1):
        left_after = 2 * (pp - 1 - d)  # chunks still to cut after this depth's two
        rows, cols = np.nonzero(value < inf)  # the states reached so far span [i0, i1] x [j0, j1]
        i0, i1, j0, j1 = rows.min(), rows.max(), cols.min(), cols.max()
        new, took = np.full_like(value, inf), np.zeros((2, n + 1, n + 1), np.int64)
        for a in lengths:
            for b in lengths:
                if run_min[a] + run_min[b] > bound:
                    break
                i, j = np.arange(i0, min(i1, n - a) + 1), np.arange(max(j0, b), j1 + 1)
                if not len(i) or not len(j):
                    continue
                src, dst = np.ix_(i, j), np.ix_(i + a, j - b)
                left = (s[i + a] - s[i])[:, None]
                right = (s[j] - s[j - b] + np.where(j == n, tail, 0))[None, :]
                if even:
                    v = value[src] + left ** 2 + right ** 2
                else:
                    v = np.maximum(value[src], left + right)
                ok = (left + right <= bound) & ((j - b)[None, :] - (i + a)[:, None] >= left_after)
                better = ok & (v < new[dst])
                new[dst] = np.where(better, v, new[dst])
                took[0][dst] = np.where(better, a, took[0][dst])
                took[1][dst] = np.where(better, b, took[1][dst])
        value = new
        steps.append(took)
    # the innermost rank: [i, j) as two chunks split at m
    best = (inf, 0, 0, 0)
    for i, j in zip(*np.nonzero(value < inf)):
        i, j = int(i), int(j)
        inner = s[j] - s[i] + (tail if j == n else 0)
        if j - i < 2 or inner > bound:
            continue
        m = min(range(i + 1, j), key=lambda m: abs(2 * (s[m] - s[i]) - inner))  # the most even split
        parts = (s[m] - s[i], inner - (s[m] - s[i]))
        v = value[i, j] + parts[0] ** 2 + parts[1] ** 2 if even else max(value[i, j], inner)
        if v < best[0]:
            best = (v, i, j, m)
    v, i, j, m = best
    lefts, rights = [i, m], [j]
    for took in reversed(steps):
        i, j = i - int(took[0][i, j]), j + int(took[1][i, j])
        lefts.insert(0, i)
        rights.append(j)
    return v, lefts + rights


def describe_partition(cfg: ModelConfig, ranges: list[range], pp: int, schedule: str, seq_len: int) -> str:
    costs, tail = layer_costs(cfg, seq_len)
    total = sum(costs) + tail
    lines = []
    for c, r in enumerate(ranges):
        cost = sum(costs[i] for i in r) + (tail if c == len(ranges) - 1 else 0.0)
        parts = (["embedding"] if c == 0 else []) + [f"layers {r.start}-{r.stop - 1}"] + (
            ["norm, head" + (f", MTP x {cfg.num_nextn_predict_layers}" if cfg.num_nextn_predict_layers else "")]
            if c == len(ranges) - 1 else [])
        lines.append(f"chunk {c} on pipeline rank {chunk_rank(c, pp, schedule)}: {', '.join(parts)} "
                     f"({100 * cost / total:.0f}% of the FLOPs)")
    if schedule == "dualpipev":
        ranks = rank_costs(costs, tail, [r.start for r in ranges] + [ranges[-1].stop], pp, schedule)
        lines.append(f"per rank {', '.join(f'{100 * x / total:.0f}%' for x in ranks)} (largest "
                     f"{max(ranks) / (total / pp):.2f}x the mean)")
    return "; ".join(lines)


# ------------------------------------------------------------------------------------------------ schedules

def schedule(rank: int, pp: int, micro_batches: int, kind: str, zero_bubble: bool = True) -> list[Op]:
    """The ops pipeline rank `rank` runs for one step of `micro_batches` micro-batches (module docstring);
    zero_bubble=False: DualPipeV without the W split (no W ops, no B defers)."""
    if micro_batches < min_micro_batches(pp, kind):
        raise ConfigError(f"{kind} over {pp} pipeline ranks needs at least {min_micro_batches(pp, kind)} micro-batches "
                          f"a step, got {micro_batches}")
    if kind == "1f1b":
        return _one_f_one_b(rank, pp, micro_batches)
    ops = _dualpipev(rank, pp, micro_batches)
    if zero_bubble:
        return ops
    return [Op(op.kind, op.chunk, op.micro_batch, op.paired) for op in ops if op.kind != "W"]


def _one_f_one_b(stage: int, pp: int, m: int) -> list[Op]:
    warmup = min(pp - stage - 1, m)
    ops = [Op("F", stage, i) for i in range(warmup)]
    for i in range(m - warmup):
        ops += [Op("F", stage, warmup + i), Op("B", stage, i)]
    ops += [Op("B", stage, i) for i in range(m - warmup, m)]
    return ops


def _dualpipev(rank: int, pp: int, m: int) -> list[Op]:
    c0, c1 = rank, 2 * pp - 1 - rank
    next_mb = {("F", c0): 0, ("F", c1): 0, ("B", c0): 0, ("B", c1): 0}
    ops: list[Op] = []
    deferred: list[Op] = []  # the defer_w B's whose W has not been issued, oldest first

    def run(kind: str, chunk: int, paired: bool = False, defer_w: bool = False) -> None:
        ops.append(Op(kind, chunk, next_mb[kind, chunk], paired, defer_w))
        next_mb[kind, chunk] += 1
        if defer_w:
            deferred.append(ops[-1])

    def weights() -> None:
        b = deferred.pop(0)
        ops.append(Op("W", b.chunk, b.micro_batch))

    tail = pp - rank - 1
    for _ in range(2 * tail):                       # 1: F0
        run("F", c0)
    for _ in range(rank + 1):                       # 2: F0 F1
        run("F", c0)
        run("F", c1)
    for _ in range(tail):                           # 3: B1 W F1
        run("B", c1, defer_w=True)
        weights()
        run("F", c1)
    for _ in range(m - 2 * pp + rank + 1):          # 4: F0&B1, F1&B0 (the pairs DualPipe overlaps)
        run("F", c0, paired=True)
        run("B", c1)
        run("F", c1, paired=True)
        run("B", c0)
    for _ in range(tail):                           # 5: B1, F1&B0
        run("B", c1)
        run("F", c1, paired=True)
        run("B", c0)
    # 6: B1 B0, the second half deferring: from pair (r+1)//2 on, from its B1 on odd ranks, its B0 on even ones
    half = (rank + 1) // 2
    for i in range(rank + 1):
        run("B", c1, defer_w=i > half or (i == half and rank % 2 == 1))
        run("B", c0, defer_w=i >= half)
    for _ in range(tail):                           # 7: W B0
        weights()
        run("B", c0, defer_w=True)
    for _ in range(rank + 1):                       # 8: W
        weights()
    assert not deferred
    return ops
