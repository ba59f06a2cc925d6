"""An event simulator of pipeline schedules: 1F1B, ZB1P, DualPipe and DualPipeV (report §3.2.1, Table 2).

Who defines what: the orders the trainer runs, 1F1B and DualPipeV, are defined once, by
`sourcelm.parallel.pipeline_plan.schedule` (the op lists its executor runs); `trainer_schedule` turns them
into this module's steps. ZB1P and DualPipe, which the trainer does not run, are defined here. This module
is the only simulator of them all: deadlocks, idle time, activations in flight.

A schedule is, per rank, an ordered list of steps; a step runs one chunk task (F: forward, B: full
backward, Bi: backward for inputs only, W: backward for weights) or an overlapped forward/backward pair
(DualPipe's "F&B"). Each micro-batch follows a path of stage chunks, one rank per chunk. The
simulator runs every rank's list in order; a step starts when its rank is free and its inputs have
arrived (a pair: the inputs of both its tasks, as the two run together):
  F of chunk s      after F of chunk s-1 (the activation sent by the previous rank),
  B/Bi of chunk s   after B/Bi of chunk s+1 (the gradient coming back), or after its own F on the last chunk,
  W of chunk s      after Bi of chunk s (on the same rank, earlier in its list).
Communication takes no time and sends are buffered (a sender never waits for its receiver); a step's
outputs leave when the step ends, or `delay` steps later where the schedule defers a send (DualPipe
queues some sends behind the next chunk). So the idle time per rank is the bubble of the schedule
itself, the quantity of the report's Table 2. Each rank computes alone (a GPU), unless `speed` says how
fast the running steps go while k ranks run: the CPU box, whose ranks share its cores, where one rank's
wait speeds the others up and shrinks both the busy time and the bubble.

What a pair costs is the `times` object's choice: `ChunkTimes` takes the report's F&B as a given figure
(`fb`; by default F + B, a pair that gains nothing from the overlap), the planner's `estimate.StageTimes`
derives it from the two chunks' compute and communication. The simulator assumes only that a pair's
outputs leave when the pair ends.

Orders:
  1f1b       the trainer's (`pipeline_plan.schedule`): warm-up of P-1-r forwards on rank r, then one
             forward / one backward, then the rest of the backwards.
  zb1p       ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism"): the 1F1B order of F and Bi; rank r
             lets its W passes trail its Bi passes by r micro-batches, so the Bi passes of the cool-down
             reach the first ranks sooner and the trailing W passes fill the waits there.
  dualpipe   DeepSeek's schedule, the 8 phases of `DualPipe.step` (reference §4.3.7): micro-batches enter
             from both ends; rank r holds stage r of one direction and stage P-1-r of the other.
  dualpipev  the trainer's (`pipeline_plan.schedule`): the cut-in-half variant, P ranks, 2P chunks in a V
             (rank r holds chunks r and 2P-1-r), DeepSeek's phases with its zero-bubble W split (a B marked
             `defer_w` is a Bi here, and the trainer's W ops are W steps), its F&B pairs as overlapped steps
             and every send leaving at once; so its bubble is Table 2's (without the split, W = 0's).

Activations in flight: a chunk's activations live from the start of its forward to the end of its
backward for inputs (B or Bi); W keeps only the layer inputs and output gradients, which the report's
memory column does not count either.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass, field

from sourcelm.config import ConfigError
from sourcelm.parallel import pipeline_plan

SCHEDULES = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Task:
    kind: str  # "F", "B" (full backward), "Bi" (backward for inputs), "W" (backward for weights)
    mb: int  # micro-batch id
    chunk: int  # position on the micro-batch's path (0 = the first stage chunk)


@dataclass(frozen=True)
class Step:
    tasks: tuple[Task, ...]  # one task, or an overlapped (F, B) pair
    delay: int = 0  # cross-rank outputs leave at the end of the step this many steps later


@dataclass
class Schedule:
    name: str
    ranks: int
    n_micro: int
    paths: dict[int, list[int]]  # micro-batch -> the rank of each chunk on its path
    orders: list[list[Step]] = field(default_factory=list)

    @property
    def stages(self) -> int:
        """Stage chunks the model is cut into (P for 1F1B, ZB1P and DualPipe; 2P for DualPipeV)."""
        return max(len(p) for p in self.paths.values())


@dataclass(frozen=True)
class ChunkTimes:
    """Seconds for one micro-batch through one stage chunk. b is the full backward (inputs and weights),
    w its weight part, fb an overlapped forward + full backward pair, the report's F&B (default f + b: no
    overlap gain)."""

    f: float
    b: float
    w: float = 0.0
    fb: float | None = None

    def duration(self, step: Step) -> float:
        kinds = tuple(t.kind for t in step.tasks)
        if kinds == ("F", "B"):
            return self.f + self.b if self.fb is None else self.fb
        if len(kinds) != 1:
            raise ValueError(f"no duration for the overlapped pair {kinds}")
        return {"F": self.f, "B": self.b, "Bi": self.b - self.w, "W": self.w}[kinds[0]]


@dataclass
class Slot:
    step: Step
    start: float
    end: float


@dataclass
class RankTimeline:
    rank: int
    slots: list[Slot]
    busy: float
    idle: float  # makespan - busy: the rank's share of the bubble
    peak_activations: int  # chunk activations alive at once (F started, B/Bi not finished)
    chunks_held: int  # distinct stage chunks whose parameters the rank holds


@dataclass
class SimResult:
    schedule: Schedule
    times: object
    makespan: float
    ranks: list[RankTimeline]

    @property
    def bubble(self) -> float:
        """The largest idle time of any rank (the formula's quantity; every rank's is in `ranks`)."""
        return max(r.idle for r in self.ranks)

    @property
    def peak_activations(self) -> int:
        return max(r.peak_activations for r in self.ranks)

    @property
    def chunks_per_rank(self) -> int:
        return max(r.chunks_held for r in self.ranks)


# ------------------------------------------------------------------------------------------ orders


def _single(kind: str, mb: int, chunk: int) -> Step:
    return Step((Task(kind, mb, chunk),))


def trainer_schedule(name: str, ranks: int, n_micro: int, overlap_pairs: bool = True,
                     zero_bubble: bool = True) -> Schedule:
    """The trainer's 1F1B or DualPipeV (`pipeline_plan.schedule`) as steps: each op one step, except that an F
    marked `paired` and the B after it make one overlapped step. overlap_pairs=False keeps them two steps, F
    then B, each starting when its own input is in, as the trainer's executor runs a pair today. A B marked
    `defer_w` is a Bi (its W op a W step); zero_bubble=False: the schedule without the W split. A task's
    chunk is the trainer's chunk number: its chunks are the positions on every micro-batch's path."""
    path = [pipeline_plan.chunk_rank(c, ranks, name) for c in range(pipeline_plan.n_chunks(ranks, name))]
    sched = Schedule(name, ranks, n_micro, {m: path for m in range(n_micro)})
    for r in range(ranks):
        order: list[Step] = []
        pair: list[Task] = []
        for op in pipeline_plan.schedule(r, ranks, n_micro, name, zero_bubble):
            pair.append(Task("Bi" if op.defer_w else op.kind, op.micro_batch, op.chunk))
            if not (op.paired and overlap_pairs):
                order.append(Step(tuple(pair)))
                pair = []
        sched.orders.append(order)
    return sched


def _one_f_one_b_order(p: int, n: int, r: int, backward) -> list[Step]:
    """Rank r's 1F1B order for ZB1P (the trainer's 1F1B takes at least P micro-batches, ZB1P here any
    count); backward(m) gives the steps of micro-batch m's backward."""
    warm = min(p - 1 - r, n)
    order = [_single("F", m, r) for m in range(warm)]
    for i in range(n - warm):
        order.append(_single("F", warm + i, r))
        order += backward(i)
    for m in range(n - warm, n):
        order += backward(m)
    return order


class _TrailingWeights:
    """ZB-H1's backward on rank r: Bi of micro-batch m, then the W that trails it by `lag` micro-batches."""

    def __init__(self, r: int, lag: int):
        self.r, self.lag, self.next_w = r, lag, 0

    def __call__(self, m: int) -> list[Step]:
        steps = [_single("Bi", m, self.r)]
        if m - self.lag >= self.next_w:
            steps.append(_single("W", self.next_w, self.r))
            self.next_w += 1
        return steps


def zb1p(p: int, n: int) -> Schedule:
    """ZB-H1: the 1F1B order of F and Bi, rank r's W passes trailing by r micro-batches (every rank then
    holds P micro-batches between F and W, the 1F1B peak), the rest of them at the end."""
    sched = Schedule("zb1p", p, n, {m: list(range(p)) for m in range(n)})
    for r in range(p):
        backward = _TrailingWeights(r, lag=r)
        order = _one_f_one_b_order(p, n, r, backward)
        sched.orders.append(order + [_single("W", m, r) for m in range(backward.next_w, n)])
    return sched


class _DualOrder:
    """One rank's step list under DualPipe(V), built phase by phase as `DualPipe.step` issues it.

    `phase_chunk[ph]` is the chunk (position on the path) this rank runs in phase ph and
    `phase_mbs[ph]` the micro-batches of that phase, in order; forwards and backwards of a phase take
    them in turn, and W passes pop the zero-bubble backwards first in, first out."""

    def __init__(self, phase_chunk: tuple[int, int], phase_mbs: tuple[list[int], list[int]]):
        self.chunk, self.mbs = phase_chunk, phase_mbs
        self.n_f, self.n_b = [0, 0], [0, 0]
        self.w_queue: list[Task] = []
        self.steps: list[Step] = []

    def _task(self, kind: str, ph: int) -> Task:
        count = self.n_f if kind == "F" else self.n_b
        task = Task(kind, self.mbs[ph][count[ph]], self.chunk[ph])
        count[ph] += 1
        return task

    def forward(self, ph: int, delay: int = 0) -> None:
        self.steps.append(Step((self._task("F", ph),), delay))

    def backward(self, ph: int, zb: bool = False) -> None:
        task = self._task("Bi" if zb else "B", ph)
        if zb:
            self.w_queue.append(Task("W", task.mb, task.chunk))
        self.steps.append(Step((task,)))

    def weight(self) -> None:
        self.steps.append(Step((self.w_queue.pop(0),)))

    def forward_backward(self, ph_f: int, ph_b: int) -> None:
        self.steps.append(Step((self._task("F", ph_f), self._task("B", ph_b))))


def _dual_phases(o: _DualOrder, n_ranks: int, rank: int, n_chunks: int, is_end: bool) -> list[Step]:
    """The 8 phases of DualPipe.step for one rank. n_ranks/rank are DualPipe's half-ranks (P/2, h);
    n_chunks the micro-batches per phase (N/2); is_end: the rank where the two phases meet (the middle
    ranks), which does not overlap its first step-4 pair and defers sends. (DualPipeV's phases are the
    trainer's: `pipeline_plan`.)"""
    for _ in range((n_ranks - rank - 1) * 2):  # 1: forwards of phase 0
        o.forward(0)
    for i in range(rank + 1):  # 2: phase 0 and phase 1 forwards in turn
        # the phase-0 output leaves after the phase-1 forward, except where the phases meet;
        # there the last phase-1 output waits for the next forward
        o.forward(0, delay=0 if is_end else 1)
        o.forward(1, delay=1 if is_end and i == rank else 0)
    for _ in range(n_ranks - rank - 1):  # 3: zero-bubble backward, weights, forward
        o.backward(1, zb=True)
        o.weight()
        o.forward(1)
    for i in range(n_chunks - 2 * n_ranks + rank + 1):  # 4: the overlapped main phase
        if i == 0 and is_end:  # not overlapped, to shrink the bubble; the forward's output waits for the backward
            o.forward(0, delay=1)
            o.backward(1)
        else:
            o.forward_backward(0, 1)
        o.forward_backward(1, 0)
    for _ in range(n_ranks - rank - 1):  # 5
        o.backward(1)
        o.forward_backward(1, 0)
    zb = False
    for i in range(rank + 1):  # 6: the second half of these backwards leave their weights for later
        if i == (rank + 1) // 2 and rank % 2 == 1:
            zb = True
        o.backward(1, zb)
        if i == (rank + 1) // 2 and rank % 2 == 0:
            zb = True
        o.backward(0, zb)
    for _ in range(n_ranks - rank - 1):  # 7
        o.weight()
        o.backward(0, zb=True)
    for _ in range(rank + 1):  # 8
        o.weight()
    if o.w_queue:
        raise AssertionError("DualPipe order left weight passes unrun")
    return o.steps


def dualpipe(p: int, n: int) -> Schedule:
    """DualPipe on p ranks (p stages), n micro-batches in all, n/2 entering from each end."""
    half = n // 2
    paths = {m: list(range(p)) for m in range(half)}  # direction 0: rank 0 -> p-1
    paths.update({half + k: list(range(p - 1, -1, -1)) for k in range(half)})  # direction 1: p-1 -> 0
    sched = Schedule("dualpipe", p, n, paths)
    for r in range(p):
        second = r >= p // 2
        # phase 0 is the direction entering at this rank's end of the pipeline
        d0, d1 = (1, 0) if second else (0, 1)
        chunk = {0: r, 1: p - 1 - r}  # this rank's chunk on each direction's path
        mbs = {d: list(range(d * half, (d + 1) * half)) for d in (0, 1)}
        o = _DualOrder((chunk[d0], chunk[d1]), (mbs[d0], mbs[d1]))
        h = min(r, p - 1 - r)
        sched.orders.append(_dual_phases(o, p // 2, h, half, is_end=h == p // 2 - 1))
    return sched


def check_schedule(name: str, ranks: int, n_micro: int) -> None:
    """Raises ConfigError naming the field when the schedule cannot run this many ranks/micro-batches."""
    if name not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule = {name!r}: choose one of {', '.join(map(repr, SCHEDULES))}")
    if ranks < 1 or n_micro < 1:
        raise ConfigError(f"parallel.pp = {ranks} and the micro-batch count {n_micro} must be >= 1")
    fix = "raise schedule.global_batch or lower schedule.micro_batch or parallel.pp"
    if name == "dualpipe" and (ranks % 2 or n_micro % 2 or n_micro < 2 * ranks):
        raise ConfigError(f"parallel.pp_schedule = 'dualpipe' needs an even parallel.pp (got {ranks}) and an even "
                          f"number of micro-batches, at least 2 x pp = {2 * ranks} (got {n_micro}); {fix}")
    if name == "dualpipev" and n_micro < 2 * ranks:
        raise ConfigError(f"parallel.pp_schedule = 'dualpipev' needs at least 2 x pp = {2 * ranks} micro-batches "
                          f"(got {n_micro}); {fix}")
    if name == "1f1b" and n_micro < ranks:  # the trainer's 1F1B (pipeline_plan.min_micro_batches)
        raise ConfigError(f"parallel.pp_schedule = '1f1b' needs at least pp = {ranks} micro-batches (got {n_micro}); "
                          f"{fix}")


@functools.lru_cache(maxsize=128)
def build_schedule(name: str, ranks: int, n_micro: int) -> Schedule:
    """The schedule's orders (cached: the search asks for the same ones many times; do not modify them)."""
    check_schedule(name, ranks, n_micro)
    if name in pipeline_plan.SCHEDULES:
        return trainer_schedule(name, ranks, n_micro)
    return {"zb1p": zb1p, "dualpipe": dualpipe}[name](ranks, n_micro)


# -------------------------------------------------------------------------------------- simulation


def _needs(task: Task, path_len: int) -> list[tuple[str, int, int]]:
    """Keys (kind, mb, chunk) of the tasks whose outputs this task consumes."""
    if task.kind == "F":
        return [("F", task.mb, task.chunk - 1)] if task.chunk else []
    if task.kind in ("B", "Bi"):
        if task.chunk == path_len - 1:
            return [("F", task.mb, task.chunk)]  # the loss, on this rank
        return [("Bx", task.mb, task.chunk + 1)]  # the input gradient of the next chunk (B or Bi)
    return [("Bx", task.mb, task.chunk)]


def simulate(schedule: Schedule, times, p2p: float = 0.0, speed=None) -> SimResult:
    """Runs every rank's steps in order; returns the timelines. Raises if the orders deadlock.
    times: anything with `duration(step)` (ChunkTimes: the same for every chunk); p2p: seconds an
    output takes to reach another rank (0: the bubble of the schedule alone); speed: None (each rank
    computes alone: a step takes its duration), or speed(k), how fast every running step goes while k
    ranks are busy, as a multiple of its duration's pace: ranks that share cores (a CPU box with more
    processes than cores, where one rank's wait frees its share for the others).

    An event simulation: at each instant a free rank starts its next step once that step's inputs are
    in; time runs to the next step's end or the next input's arrival. All running steps go at one pace,
    so each one's end is fixed in "work time" (the integral of the pace) when it starts."""
    p = schedule.ranks
    pace = speed or (lambda busy: 1.0)
    producer: dict[tuple, int] = {}  # output key (kind, mb, chunk) -> the rank that made it
    finished: dict[tuple, float] = {}  # key -> end of the step that made it (for its own rank)
    arrives: dict[tuple, float] = {}  # key -> when it reaches other ranks
    deferred: list[dict[int, list[tuple]]] = [{} for _ in range(p)]  # rank -> step index -> keys leaving then
    waiters: dict[tuple, list[int]] = {}  # key -> ranks blocked on it
    wakes: list[tuple[float, int]] = []  # (arrival of the input a rank waits for, rank)
    ends: list[tuple[float, int]] = []  # (work time at which a running step ends, rank)
    started: dict[int, float] = {}  # rank -> start of its running step
    pos = [0] * p
    slots: list[list[Slot]] = [[] for _ in range(p)]
    now = work = 0.0  # real time; work time
    check = set(range(p))  # ranks that may start a step now

    def try_start(r: int) -> None:
        if r in started or pos[r] == len(schedule.orders[r]):
            return
        step, t = schedule.orders[r][pos[r]], 0.0
        for task in step.tasks:
            for key in _needs(task, len(schedule.paths[task.mb])):
                at = finished.get(key) if producer.get(key) == r else arrives.get(key)
                if at is None:
                    waiters.setdefault(key, []).append(r)
                    return
                t = max(t, at)
        if t > now:
            heapq.heappush(wakes, (t, r))
            return
        started[r] = now
        heapq.heappush(ends, (work + times.duration(step), r))

    def finish(r: int) -> None:
        step = schedule.orders[r][pos[r]]
        slots[r].append(Slot(step, started.pop(r), now))
        keys = [("Bx" if t.kind in ("B", "Bi") else t.kind, t.mb, t.chunk) for t in step.tasks]
        for key in keys:
            producer[key], finished[key] = r, now
            check.update(waiters.pop(key, ()))
        leaving = deferred[r].pop(pos[r], [])
        if step.delay:
            deferred[r].setdefault(pos[r] + step.delay, []).extend(keys)
        else:
            leaving = keys + leaving
        for key in leaving:
            arrives[key] = now + p2p
            check.update(waiters.pop(key, ()))
        pos[r] += 1
        check.add(r)

    while True:
        for r in sorted(check):
            try_start(r)
        check.clear()
        if not ends and not wakes:
            break
        rate = pace(len(started)) if started else 1.0  # nothing runs: work time stands still
        next_end = now + (ends[0][0] - work) / rate if ends else float("inf")
        if wakes and wakes[0][0] < next_end:
            work += (wakes[0][0] - now) * rate
            now = wakes[0][0]
        else:
            work, now = ends[0][0], next_end
        while wakes and wakes[0][0] <= now:
            check.add(heapq.heappop(wakes)[1])
        while ends and ends[0][0] <= work:
            finish(heapq.heappop(ends)[1])
    stuck = {r: order[pos[r]].tasks for r, order in enumerate(schedule.orders) if pos[r] < len(order)}
    if stuck:
        raise RuntimeError(f"schedule {schedule.name} deadlocks; waiting: {stuck}")
    makespan = max((s[-1].end for s in slots if s), default=0.0)
    timelines = []
    for r in range(p):
        busy = sum(s.end - s.start for s in slots[r])
        chunks = {t.chunk for s in slots[r] for t in s.step.tasks}
        timelines.append(RankTimeline(r, slots[r], busy, makespan - busy, _peak_live(slots[r]), len(chunks)))
    return SimResult(schedule, times, makespan, timelines)


@dataclass
class PipelineRun:
    """What a step of the schedule costs: the makespan and, per rank, busy and idle time, the most chunk
    activations alive at once and the chunks held."""

    makespan: float
    busy: list[float]
    peak_activations: list[int]
    chunks_held: list[list[int]]
    simulated_micro_batches: tuple[int, ...]  # the runs behind these numbers

    @property
    def idle(self) -> list[float]:
        return [self.makespan - b for b in self.busy]

    @property
    def bubble(self) -> float:
        return max(self.idle)


def _summary(res: SimResult) -> PipelineRun:
    held = [sorted({t.chunk for s in r.slots for t in s.step.tasks}) for r in res.ranks]
    return PipelineRun(res.makespan, [r.busy for r in res.ranks], [r.peak_activations for r in res.ranks], held,
                       (res.schedule.n_micro,))


def run_schedule(name: str, ranks: int, n_micro: int, times, p2p: float = 0.0, speed=None) -> PipelineRun:
    """The schedule with `n_micro` micro-batches. Past 4 x ranks micro-batches every further pair adds the
    same work to every rank (the steady phase repeats), so long runs are extrapolated from two short ones,
    n1 and n1 + 2 micro-batches: exact, and 100x faster for the report's 120 micro-batches x 16 ranks. With a
    `speed` (shared cores) the makespan stays exact, a rank's busy time within 1e-4 of the makespan."""
    n1 = 4 * ranks + (n_micro - 4 * ranks) % 2
    if n_micro <= n1 + 2:
        return _summary(simulate(build_schedule(name, ranks, n_micro), times, p2p, speed))
    a = simulate(build_schedule(name, ranks, n1), times, p2p, speed)
    b = simulate(build_schedule(name, ranks, n1 + 2), times, p2p, speed)
    pairs = (n_micro - n1) / 2
    return PipelineRun(a.makespan + pairs * (b.makespan - a.makespan),
                       [ra.busy + pairs * (rb.busy - ra.busy) for ra, rb in zip(a.ranks, b.ranks)],
                       [r.peak_activations for r in b.ranks], _summary(b).chunks_held, (n1, n1 + 2))


def _peak_live(slots: list[Slot]) -> int:
    """Most chunk activations alive at once: +1 when a forward starts, -1 when B/Bi ends."""
    events = []
    for s in slots:
        for t in s.step.tasks:
            if t.kind == "F":
                events.append((s.start, 1))
            elif t.kind in ("B", "Bi"):
                events.append((s.end, -1))
    live = peak = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):  # frees before allocations at equal times
        live += delta
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------- the report's Table 2


def table2(name: str, stages: int, times: ChunkTimes) -> dict:
    """Table 2 of the report for a pipeline of `stages` stage chunks (PP): the bubble, parameters and
    activations per device (in units of one chunk's parameters / one micro-batch's chunk activations)
    and the device count. The simulated schedules idle exactly the formula's bubble for 1F1B at any times,
    for ZB1P while W <= F, for DualPipe and the trainer's DualPipeV in the proportions of the report's
    figure (B - W = F, W <= F, F&B <= F + B; DualPipeV without its W split with W = 0 while
    F <= B <= F&B <= F + B); outside them the formula is an approximation and the simulator the reference."""
    f, b, w = times.f, times.b, times.w
    fb = f + b if times.fb is None else times.fb
    pp = stages
    rows = {
        "1f1b": ((pp - 1) * (f + b), 1, pp, pp),
        "zb1p": ((pp - 1) * (f + b - 2 * w), 1, pp, pp),
        "dualpipe": ((pp / 2 - 1) * (fb + b - 3 * w), 2, pp + 1, pp),
        "dualpipev": ((pp / 2 - 1) * (fb + b - 3 * w), 2, pp + 1, pp // 2),
    }
    bubble, params, acts, devices = rows[name]
    return {"bubble": bubble, "params_per_device": params, "activations_per_device": acts, "devices": devices}
