"""The pipeline simulator against the report's Table 2, and its 1F1B and DualPipeV against the trainer's schedules
(`sourcelm.parallel.pipeline_plan.schedule`, which defines them).

Table 2 (report §3.2.1, reference §4.2): bubbles 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe and
DualPipeV (PP/2-1)(F&B+B-3W); parameters per device 1x, 1x, 2x, 2x; activations per device PP, PP, PP+1,
PP+1; devices PP, PP, PP, PP/2. PP counts stage chunks (DualPipeV runs 2P chunks on P ranks).
"""

from __future__ import annotations

import random

import pytest

from sourcelm.config import ConfigError
from sourcelm.parallel.pipeline_plan import chunk_rank, schedule
from sourcelm.plan import pipeline_sim as ps

# (F, B, W, F&B): B is the full backward, W its weight part
TIMES = [(1.0, 2.0, 1.0, 3.0), (1.0, 2.0, 1.0, 2.5), (2.0, 3.0, 1.0, 4.0), (1.5, 2.0, 0.5, 3.0), (3.0, 5.0, 2.0, 7.0),
         (2.0, 4.0, 2.0, 5.0)]


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
@pytest.mark.parametrize("p", [2, 4, 8, 16])
def test_1f1b_and_zb1p_bubbles_equal_table2(name, p):
    """Any times for 1F1B; for ZB1P while W <= F (the deferred W passes must fit the waits they fill:
    with F = 1, B = 3, W = 2 the formula gives 0, and no ZB-H1 order reaches it)."""
    extra = [(1.0, 2.0, 0.7, 2.4)] + ([(1.0, 3.0, 2.0, 3.5)] if name == "1f1b" else [])
    for f, b, w, fb in TIMES + extra:
        times = ps.ChunkTimes(f, b, w, fb)
        for n in (p, 2 * p + 1, 4 * p + 2):
            res = ps.simulate(ps.build_schedule(name, p, n), times)
            expect = ps.table2(name, p, times)["bubble"]
            # every rank idles exactly the formula's time
            assert all(abs(r.idle - expect) < 1e-9 for r in res.ranks), (name, p, n, (f, b, w), expect,
                                                                         [r.idle for r in res.ranks])


@pytest.mark.parametrize("name", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("ranks", [2, 4, 6, 8, 16])
def test_dualpipe_bubbles_equal_table2(name, ranks):
    """DualPipe: exact for the proportions of the report's figure: backward for inputs as long as a forward
    (B - W = F), W <= F, and an overlapped pair no slower than its parts in turn (every TIMES row). Outside
    them the schedule's real bubble differs from the formula, e.g. (F, B, W, F&B) = (1, 2, 0.5, 2.5) on 4
    DualPipe ranks idles 2.5, the formula says 3.0; the simulator is then the reference.
    DualPipeV is the trainer's, with its zero-bubble W split: exact likewise; without the split (full backwards, no
    W pass) exact with W = 0 (every TIMES row has F <= B <= F&B <= F + B)."""
    if name == "dualpipe" and ranks % 2:
        pytest.skip("DualPipe needs an even rank count")
    stages = 2 * ranks if name == "dualpipev" else ranks
    for f, b, w, fb in TIMES:
        times = ps.ChunkTimes(f, b, w, fb)
        for n in (2 * ranks, 2 * ranks + 2, 5 * ranks + 2):
            res = ps.simulate(ps.build_schedule(name, ranks, n), times)
            expect = ps.table2(name, stages, times)["bubble"]
            assert abs(res.bubble - expect) < 1e-9, (name, ranks, n, (f, b, w, fb), res.bubble, expect)
            if name == "dualpipev":
                full = ps.simulate(ps.trainer_schedule(name, ranks, n, zero_bubble=False), times)
                expect = ps.table2(name, stages, ps.ChunkTimes(f, b, 0.0, fb))["bubble"]
                assert abs(full.bubble - expect) < 1e-9, (ranks, n, (f, b, w, fb), full.bubble, expect)


@pytest.mark.parametrize("name", ps.SCHEDULES)
def test_memory_columns_of_table2(name):
    for ranks in (2, 4, 8):
        res = ps.simulate(ps.build_schedule(name, ranks, 4 * ranks), ps.ChunkTimes(1.0, 2.0, 1.0, 3.0))
        stages = res.schedule.stages
        row = ps.table2(name, stages, res.times)
        assert res.chunks_per_rank == row["params_per_device"]
        assert res.peak_activations == row["activations_per_device"], (name, ranks)
        assert ranks == row["devices"]
        assert stages == (2 * ranks if name == "dualpipev" else ranks)


@pytest.mark.parametrize("name", ps.SCHEDULES)
def test_every_chunk_runs_every_micro_batch_once(name):
    ranks, n = 4, 10
    sched = ps.build_schedule(name, ranks, n)
    seen = {}
    for r, order in enumerate(sched.orders):
        for step in order:
            for t in step.tasks:
                assert sched.paths[t.mb][t.chunk] == r  # the task runs on the rank holding its chunk
                seen[(t.kind, t.mb, t.chunk)] = seen.get((t.kind, t.mb, t.chunk), 0) + 1
    for mb, path in sched.paths.items():
        for c in range(len(path)):
            fwd = seen.get(("F", mb, c), 0)
            full, inputs, weights = (seen.get((k, mb, c), 0) for k in ("B", "Bi", "W"))
            assert fwd == 1 and full + inputs == 1 and weights == inputs, (name, mb, c)


def test_dualpipe_beats_1f1b_at_the_same_ranks_and_micro_batches():
    times = ps.ChunkTimes(1.0, 2.0, 1.0, 2.5)
    for p in (4, 8):
        bubbles = {k: ps.simulate(ps.build_schedule(k, p, 4 * p), times).bubble for k in ps.SCHEDULES}
        assert bubbles["dualpipe"] < bubbles["zb1p"] < bubbles["1f1b"]


def test_ranks_sharing_cores_run_faster_while_others_wait():
    """speed(k): every running step's pace while k ranks run. 1F1B on 2 ranks, 2 micro-batches, F = 1, B = 2, a
    rank alone twice as fast: by hand, rank 0 runs F0 0-0.5, F1 0.5-1.5, B0 2.5-4.5 (half of it at pace 1 beside
    rank 1's F1, half beside its B1), B1 5-6; rank 1 F0 0.5-1.5, B0 1.5-2.5, F1 2.5-3.5, B1 3.5-5. Alone the ranks
    take 9 (Table 2: 2 x 3 + 3)."""
    sched, times = ps.build_schedule("1f1b", 2, 2), ps.ChunkTimes(1.0, 2.0)
    res = ps.simulate(sched, times, speed=lambda busy: 2.0 if busy == 1 else 1.0)
    spans = [[(s.step.tasks[0].kind, s.step.tasks[0].mb, s.start, s.end) for s in r.slots] for r in res.ranks]
    assert spans == [[("F", 0, 0.0, 0.5), ("F", 1, 0.5, 1.5), ("B", 0, 2.5, 4.5), ("B", 1, 5.0, 6.0)],
                     [("F", 0, 0.5, 1.5), ("B", 0, 1.5, 2.5), ("F", 1, 2.5, 3.5), ("B", 1, 3.5, 5.0)]]
    assert ps.simulate(sched, times).makespan == 9.0
    # a pace that does not depend on the busy count scales every time by its inverse
    for name in ps.SCHEDULES:
        one, fast = (ps.simulate(ps.build_schedule(name, 4, 10), ps.ChunkTimes(1.0, 2.5, 0.5, 3.0), p2p=0.1 * c,
                                 speed=lambda busy, c=c: 1 / c) for c in (1.0, 4.0))
        assert abs(fast.makespan - 4 * one.makespan) < 1e-9, name


def test_long_runs_extrapolate_exactly():
    """run_schedule simulates 4P and 4P + 2 micro-batches and extends the steady phase linearly; on
    uneven chunk times, with a transfer delay, and with ranks that share cores it equals the full simulation (per
    rank's idle time: within 1e-4 of the step with shared cores)."""
    rng = random.Random(3)

    class Uneven:
        def __init__(self, per):
            self.per = per

        def duration(self, step):
            if len(step.tasks) == 2:
                a, b = self.per[step.tasks[0].chunk], self.per[step.tasks[1].chunk]
                return max(0.8 * (a[0] + b[1]), a[0])
            t = step.tasks[0]
            f, b, w = self.per[t.chunk]
            return {"F": f, "B": b, "Bi": b - w, "W": w}[t.kind]

    for name in ps.SCHEDULES:
        for p in (2, 4, 6):
            chunks = 2 * p if name == "dualpipev" else p
            per = []
            for _ in range(chunks):
                f, w = rng.uniform(0.5, 2), rng.uniform(0.2, 1.5)
                per.append((f, f + w + rng.uniform(0.2, 2), w))
            # each rank alone (None), and 2 cores shared by 4 processes per pipeline rank (the CPU box)
            for speed in (None, lambda busy, p=p: min(1.0, 2 / (4 * busy)) / min(1.0, 2 / (4 * p))):
                for n in (4 * p + 6, 9 * p + 2):
                    full = ps.simulate(ps.build_schedule(name, p, n), Uneven(per), p2p=0.1, speed=speed)
                    run = ps.run_schedule(name, p, n, Uneven(per), p2p=0.1, speed=speed)
                    assert run.simulated_micro_batches != (n,)
                    assert abs(run.makespan - full.makespan) < 1e-9 * full.makespan
                    # shared cores: a rank's share of the work can settle later than the makespan's (ZB1P on 4
                    # ranks: 2e-3 of 202 s on one rank)
                    tol = 1e-9 if speed is None else 1e-4 * full.makespan
                    assert all(abs(a - r.idle) < tol for a, r in zip(run.idle, full.ranks)), (name, p, n)


@pytest.mark.parametrize("name", ["1f1b", "dualpipev"])
def test_orders_are_the_trainers_schedules(name):
    """The simulator's 1F1B and DualPipeV are the trainer's op lists: the same ops in the same order (a B marked
    `defer_w` a Bi), each F marked `paired` one overlapped step with the B after it (and two steps, F then B, when
    pairs are not overlapped), each chunk on the rank that holds it."""
    for p in (2, 4):
        n = 2 * p + 2
        sched = ps.build_schedule(name, p, n)
        in_turn = ps.trainer_schedule(name, p, n, overlap_pairs=False)
        assert all(path == [chunk_rank(c, p, name) for c in range(sched.stages)] for path in sched.paths.values())
        for r in range(p):
            ops = schedule(r, p, n, name)
            theirs = [("Bi" if op.defer_w else op.kind, op.chunk, op.micro_batch) for op in ops]
            assert (name == "dualpipev") == any(kind == "W" for kind, _, _ in theirs)
            assert [(t.kind, t.chunk, t.mb) for step in sched.orders[r] for t in step.tasks] == theirs
            pairs = [(i, i + 1) for i, op in enumerate(ops) if op.paired]
            assert [tuple((t.kind, t.chunk, t.mb) for t in step.tasks) for step in sched.orders[r]
                    if len(step.tasks) == 2] == [(theirs[i], theirs[j]) for i, j in pairs]
            assert [(t.kind, t.chunk, t.mb) for step in in_turn.orders[r] for t in step.tasks] == theirs
            assert all(len(step.tasks) == 1 for step in in_turn.orders[r])
            assert (name == "dualpipev") == bool(pairs)


def test_schedules_refuse_what_they_cannot_run():
    with pytest.raises(ConfigError, match="parallel.pp_schedule = 'dualpipe' needs an even parallel.pp"):
        ps.build_schedule("dualpipe", 3, 12)
    with pytest.raises(ConfigError, match="at least 2 x pp = 8 micro-batches"):
        ps.build_schedule("dualpipev", 4, 6)
    with pytest.raises(ConfigError, match="parallel.pp_schedule = 'gpipe'"):
        ps.build_schedule("gpipe", 2, 4)
    with pytest.raises(ConfigError, match="'1f1b' needs at least pp = 4 micro-batches"):  # as the trainer
        ps.build_schedule("1f1b", 4, 3)
