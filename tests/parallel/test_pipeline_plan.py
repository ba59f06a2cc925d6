"""The pure part of pipeline parallelism: each rank's op order against the schedule's definition, no deadlock, every
micro-batch's F and B exactly once per chunk (and under DualPipeV's zero-bubble split its W once, after its B), the
bubble against the report's Table 2, the cost-balanced cut, and the layouts that cannot work. Deadlocks and bubbles
through the one pipeline simulator, the planner's (`sourcelm.plan.pipeline_sim`)."""

import dataclasses
import itertools
import random

import pytest

from sourcelm.config import ConfigError, load_config
from sourcelm.parallel.pipeline_plan import (
    Op,
    balanced_cut,
    chunk_rank,
    describe_partition,
    layer_costs,
    partition_layers,
    rank_chunks,
    rank_costs,
    schedule,
)
from sourcelm.parallel.topology import Layout, partitions, validate_layout
from sourcelm.plan import pipeline_sim


@pytest.mark.parametrize("zero_bubble", [True, False])
@pytest.mark.parametrize("kind", ["1f1b", "dualpipev"])
@pytest.mark.parametrize("pp,m", [(2, 4), (2, 9), (4, 8), (4, 13), (3, 6), (8, 16)])
def test_every_micro_batch_runs_forward_and_backward_once_per_chunk_without_deadlock(kind, pp, m, zero_bubble):
    for overlap_pairs in (True, False):  # a pair run as one step (both inputs in) or as F then B: neither deadlocks
        pipeline_sim.simulate(pipeline_sim.trainer_schedule(kind, pp, m, overlap_pairs, zero_bubble),
                              pipeline_sim.ChunkTimes(1.0, 2.0, 0.5))  # raises on a deadlock
    chunks = 2 * pp if kind == "dualpipev" else pp
    order = [schedule(r, pp, m, kind, zero_bubble) for r in range(pp)]
    ops = [op for per_rank in order for op in per_rank]
    deferred = {(op.chunk, op.micro_batch) for op in ops if op.defer_w}
    with_w = kind == "dualpipev" and zero_bubble  # 1F1B has no W split
    assert bool(deferred) == with_w
    assert sorted(ops, key=lambda o: (o.kind, o.chunk, o.micro_batch)) == sorted(
        [Op(k, c, i) for k in "FB" for c in range(chunks) for i in range(m)] + [Op("W", *d) for d in deferred],
        key=lambda o: (o.kind, o.chunk, o.micro_batch))
    for r, per_rank in enumerate(order):
        assert {op.chunk for op in per_rank} == set(rank_chunks(r, pp, kind))
        assert all(chunk_rank(op.chunk, pp, kind) == r for op in per_rank)
        for c in rank_chunks(r, pp, kind):  # a chunk's micro-batches go in order, each B after its own F
            fs = [op.micro_batch for op in per_rank if op.chunk == c and op.kind == "F"]
            bs = [op.micro_batch for op in per_rank if op.chunk == c and op.kind == "B"]
            assert fs == bs == list(range(m))
            assert all(per_rank.index(Op("F", c, i)) < per_rank.index(Op("B", c, i)) for i in range(m))
        # each W after its own B, the W's in the order of their B's (the store pops first in, first out), and
        # neither a W nor a deferring B half of a pair (only the phases' lone ops defer)
        ws = [(op.chunk, op.micro_batch) for op in per_rank if op.kind == "W"]
        assert ws == [(op.chunk, op.micro_batch) for op in per_rank if op.defer_w]
        assert all(per_rank.index(Op("B", *w)) < per_rank.index(Op("W", *w)) for w in ws)
        assert all(op.kind == "B" for op in per_rank if op.defer_w)
        assert not any(op.paired or (i and per_rank[i - 1].paired) for i, op in enumerate(per_rank)
                       if op.kind == "W" or op.defer_w)
        if with_w:  # DeepSeek's count: phases 3 and 7 (P-r-1 each) and half of phase 6 (r+1)
            assert len(ws) == 2 * (pp - r - 1) + r + 1


def test_dualpipev_defers_where_deepseeks_phases_do():
    """Rank 1 of 4, 8 micro-batches (chunks 1 and 6): phase 3 B6 W F6 twice; phase 6 (two B1 B0 pairs) defers from
    its second pair's B1 on (rank odd), phase 7 W B1 twice, phase 8 W twice. Rank 2 (even): phase 6 defers from
    its second pair's B0 on."""
    def names(r):
        return [f"{o.kind}{o.chunk}.{o.micro_batch}{'*' if o.defer_w else ''}" for o in schedule(r, 4, 8, "dualpipev")]
    got = names(1)
    assert got[8:14] == ["B6.0*", "W6.0", "F6.2", "B6.1*", "W6.1", "F6.3"]
    assert got[-10:] == ["B6.6", "B1.4", "B6.7*", "B1.5*", "W6.7", "B1.6*", "W1.5", "B1.7*", "W1.6", "W1.7"]
    assert names(2)[-11:] == ["B5.5", "B2.4", "B5.6", "B2.5*", "B5.7*", "B2.6*", "W2.5", "B2.7*", "W5.7", "W2.6",
                              "W2.7"]


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
def test_dualpipev_pairs_are_the_steady_phases_and_independent(pp):
    """The executor runs a pair's two ops at the same time, so neither may need the other: a backward needs every
    chunk's forward of its own micro-batch, hence the two must be of different micro-batches (and chunks). The pairs
    are phase 4's F0&B1, F1&B0 and phase 5's F1&B0: (M - 2P + r + 1) x 2 + (P - r - 1) on rank r."""
    for m in range(2 * pp, 2 * pp + 6):
        for r in range(pp):
            ops = schedule(r, pp, m, "dualpipev")
            pairs = [(op, ops[i + 1]) for i, op in enumerate(ops) if op.paired]
            assert len(pairs) == 2 * (m - 2 * pp + r + 1) + (pp - r - 1)
            for f, b in pairs:
                assert (f.kind, b.kind) == ("F", "B") and f.chunk != b.chunk and f.micro_batch != b.micro_batch
            assert not any(op.paired for op in schedule(r, pp, m, "1f1b"))


def test_one_f_one_b_order_is_the_textbook_one():
    # stage 0 of 4, 6 micro-batches: 3 warm-up forwards, then F/B pairs, then the last 3 backwards
    assert [f"{o.kind}{o.micro_batch}" for o in schedule(0, 4, 6, "1f1b")] == \
        ["F0", "F1", "F2", "F3", "B0", "F4", "B1", "F5", "B2", "B3", "B4", "B5"]
    assert [f"{o.kind}{o.micro_batch}" for o in schedule(3, 4, 4, "1f1b")] == \
        ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


def test_dualpipev_order_follows_deepseeks_eight_phases():
    """P 2, 4 micro-batches, rank 0 (chunks 0 and 3): F0 x 2 (phase 1), F0 F1 (2), B1* W F1 (3), F0 B1 F1 B0 (4),
    B1 F1 B0 (5), B1 B0* (6), W B0* (7), W (8); * defers its weights. Without the split: no W, no B defers."""
    got = [f"{o.kind}{o.chunk}.{o.micro_batch}{'*' if o.defer_w else ''}" for o in schedule(0, 2, 4, "dualpipev")]
    assert got == ["F0.0", "F0.1", "F0.2", "F3.0", "B3.0*", "W3.0", "F3.1", "F0.3", "B3.1", "F3.2", "B0.0", "B3.2",
                   "F3.3", "B0.1", "B3.3", "B0.2*", "W0.2", "B0.3*", "W0.3"]
    plain = [f"{o.kind}{o.chunk}.{o.micro_batch}{'*' if o.defer_w else ''}"
             for o in schedule(0, 2, 4, "dualpipev", zero_bubble=False)]
    assert plain == [op.rstrip("*") for op in got if not op.startswith("W")]


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_bubbles_against_the_reports_table_2(pp):
    """1F1B's idle time per rank is (P-1)(F+B) exactly. DualPipeV, with the same work per rank (two chunks of half the
    layers), idles less: below 1F1B's, and Table 2's (P_V/2-1)(F&B+B-3W) for its 2P stages with F&B = F+B (no
    overlap inside a pair) exactly when each F&B pair runs as one step, at most that when a pair runs F then B (as
    the executor does without `pp_overlap`); with the W split (B - W = F, the report's figure) and without it (W = 0),
    the split idling less."""
    ps = pipeline_sim
    f, b, m = 2.0, 4.0, 4 * pp
    one_f_one_b = ps.simulate(ps.trainer_schedule("1f1b", pp, m), ps.ChunkTimes(f, b))
    assert [r.idle for r in one_f_one_b.ranks] == pytest.approx([(pp - 1) * (f + b)] * pp)
    half = ps.ChunkTimes(f / 2, b / 2, (b - f) / 2)  # each of the 2P chunks holds half a stage's layers
    bubbles = {}
    for zero_bubble in (True, False):
        w = half.w if zero_bubble else 0.0
        formula = (2 * pp / 2 - 1) * ((f / 2 + b / 2) + b / 2 - 3 * w)
        paired = ps.simulate(ps.trainer_schedule("dualpipev", pp, m, zero_bubble=zero_bubble), half)
        in_turn = ps.simulate(ps.trainer_schedule("dualpipev", pp, m, False, zero_bubble), half)
        assert paired.bubble == pytest.approx(formula)
        assert in_turn.bubble <= formula + 1e-9
        for dual in (paired, in_turn):  # the same work, fewer idle seconds
            assert dual.bubble < one_f_one_b.bubble
            assert [r.busy for r in dual.ranks] == pytest.approx([r.busy for r in one_f_one_b.ranks])
        bubbles[zero_bubble] = paired.bubble
    assert bubbles[True] < bubbles[False]


def test_too_few_micro_batches_are_refused_naming_the_minimum():
    with pytest.raises(ConfigError, match="at least 8 micro-batches"):
        schedule(0, 4, 7, "dualpipev")
    with pytest.raises(ConfigError, match="at least 4 micro-batches"):
        schedule(0, 4, 3, "1f1b")


def test_partition_balances_compute_and_keeps_every_chunk_non_empty():
    cfg = dataclasses.replace(load_config("deepseek-v3-671b").model)  # 3 dense layers, 58 MoE, MTP 1
    ranges = partition_layers(cfg, 16, "1f1b", 4096)
    assert [r.start for r in ranges] == sorted(r.start for r in ranges) and ranges[0].start == 0
    assert ranges[-1].stop == cfg.num_hidden_layers and all(len(r) >= 1 for r in ranges)
    costs, tail = layer_costs(cfg, 4096)
    chunk_cost = [sum(costs[i] for i in r) + (tail if c == 15 else 0) for c, r in enumerate(ranges)]
    even = (sum(costs) + tail) / 16
    assert max(chunk_cost) < 1.25 * even  # within one MoE layer of the even split (a chunk holds ~4 of them)
    assert len(ranges[-1]) < len(ranges[1])  # the last chunk carries the head and MTP, so fewer layers
    assert len(ranges[0]) >= len(ranges[1])  # the first holds the three cheap dense layers


def _v_score(costs, tail, pp, bounds):
    """DualPipeV's cut objective: the largest rank cost, then the sum of squared chunk costs."""
    chunks = [sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])]
    chunks[-1] += tail
    return max(rank_costs(costs, tail, bounds, pp, "dualpipev")), sum(c * c for c in chunks)


def test_dualpipev_cut_balances_ranks_then_chunks_as_exhaustive_search_does():
    """Every cut of up to 11 layers tried: the cut has the smallest largest rank (two chunks, r and 2P-1-r), and
    among those the smallest sum of squared chunk costs."""
    rng = random.Random(0)
    for trial in range(40):
        pp = rng.choice([2, 3])
        n = rng.randint(2 * pp, 11)
        costs = [rng.choice([3, 5, 8, 8, 8, 13]) for _ in range(n)]  # repeats: ties must resolve the same way
        tail = rng.choice([0, 4, 11, 30])
        best = min(_v_score(costs, tail, pp, [0, *inner, n])
                   for inner in itertools.combinations(range(1, n), 2 * pp - 1))
        got = balanced_cut(costs, tail, pp, "dualpipev")
        assert len(got) == 2 * pp + 1 and got[0] == 0 and got[-1] == n and all(a < b for a, b in zip(got, got[1:]))
        assert _v_score(costs, tail, pp, got) == best, (trial, costs, tail, got)


def test_dualpipev_cut_of_deepseek_v3_at_pp_16_balances_ranks_not_only_chunks():
    """The report's layout: 61 layers in 32 chunks. Cutting chunks alone leaves rank 0 (the first chunk, and the
    last with the head and MTP) 1.7x the mean; the rank cut brings it to its floor: one layer in each of its chunks."""
    cfg = load_config("deepseek-v3-671b").model
    costs, tail = layer_costs(cfg, 4096)
    costs, tail = [round(c) for c in costs], round(tail)
    ranges = partition_layers(cfg, 16, "dualpipev", 4096)
    bounds = [r.start for r in ranges] + [ranges[-1].stop]
    ranks = rank_costs(costs, tail, bounds, 16, "dualpipev")
    assert max(ranks) == ranks[0] == costs[0] + costs[-1] + tail  # rank 0 can hold no less
    chunk_only = rank_costs(costs, tail, balanced_cut(costs, tail, 32, "1f1b"), 16, "dualpipev")
    mean = (sum(costs) + tail) / 16
    assert max(chunk_only) / mean > 1.7 and max(ranks) / mean < 1.46
    assert max(ranks[1:]) <= 4 * costs[-1]  # the other ranks: two chunks of two MoE layers each, at most
    printed = describe_partition(cfg, ranges, 16, "dualpipev", 4096)  # what the trainer logs at start
    assert printed.startswith("chunk 0 on pipeline rank 0: embedding, layers 0-0 (")
    assert "chunk 31 on pipeline rank 0: layers 60-60, norm, head, MTP x 1" in printed
    assert printed.endswith(f"(largest {max(ranks) / mean:.2f}x the mean)") and "1.46x" in printed


def test_partition_refuses_more_chunks_than_layers():
    cfg = load_config("tiny").model  # 4 layers
    with pytest.raises(ConfigError, match="num_hidden_layers = 4"):
        partition_layers(cfg, 4, "dualpipev", 256)


def test_layer_counts_given_by_hand_cut_there_and_bad_ones_are_refused():
    cfg = load_config("tiny", ["model.num_hidden_layers=8"]).model
    assert partition_layers(cfg, 2, "dualpipev", 256, [1, 3, 3, 1]) == [range(0, 1), range(1, 4), range(4, 7),
                                                                        range(7, 8)]
    ok = load_config("tiny", ["model.num_hidden_layers=8", "parallel.pp=2", "parallel.pp_schedule=dualpipev",
                              "parallel.pp_layers=[1, 3, 3, 1]"])
    assert ok.parallel.pp_layers == [1, 3, 3, 1]
    for bad in ("[2, 2, 4]", "[0, 4, 3, 1]", "[2, 2, 2, 1]"):  # 3 chunks of 4; an empty chunk; 7 layers of 8
        with pytest.raises(ConfigError, match=r"parallel.pp_layers = .*give 4 layer counts, each >= 1, summing to "
                                              r"model.num_hidden_layers = 8"):
            load_config("tiny", ["model.num_hidden_layers=8", "parallel.pp=2", "parallel.pp_schedule=dualpipev",
                                 f"parallel.pp_layers={bad}"])
    with pytest.raises(ConfigError, match="give no layer counts"):
        load_config("tiny", ["parallel.pp_layers=[4]"])  # no pipeline


def test_config_refuses_layouts_that_cannot_work():
    with pytest.raises(ConfigError, match="parallel.pp_schedule"):
        load_config("tiny", ["parallel.pp_schedule=gpipe"])
    with pytest.raises(ConfigError, match="parallel.pp = 4 with dualpipev cuts 8 chunks"):
        load_config("tiny", ["parallel.pp=4", "parallel.pp_schedule=dualpipev"])
    with pytest.raises(ConfigError, match=r"parallel.pp = 3 must divide the world size 4"):
        validate_layout(4, 2, 1, 16, 4, pp=3)
    with pytest.raises(ConfigError, match="parallel.ep = 4 must divide the 2 ranks of a pipeline stage"):
        validate_layout(4, 2, 4, 16, 4, pp=2)


def test_pipeline_stages_are_outermost_and_groups_stay_inside_a_stage():
    parts = partitions(Layout(8, 2, 2, 16, 4, 2, pp=2))  # 2 stages of 4 ranks, EP 2
    assert parts["dp"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert parts["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert parts["ep"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert parts["expert_replica"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
