"""One layout on one cluster: memory per rank, communication and time per step, tokens/s, MFU, cost.

Time per optimizer step = the pipeline (or, without one, the micro-batches in turn) + the data-parallel
reduction + the optimizer update + the trainer's per-step bookkeeping collectives.
  compute   a chunk's FLOPs (model_costs) x tokens of a micro-batch / (efficiency x peak of the dtype);
            the efficiency is the one stated assumption about kernels (or, on the CPU box, measured: a rate
            for the output head's large GEMM and one for the rest)
  dispatch  rows per token per link class (comms: from a routing, measured or sampled) x hidden x element
            bytes / link bandwidth, plus the trainer's collectives x link latency; IB and NVLink overlap
            where the cluster's links run concurrently (DeepEP), else they add up
  overlap   a chunk alone exposes its communication; DualPipe's overlapped forward/backward pairs take
            max(compute, communication) of the pair (report §3.2.1) where the cluster's communication runs
            beside its compute (GPUs), the sum where it takes the same cores (gloo on a CPU)
  bubble    the event simulator runs the schedule on these chunk times (pipeline_sim); on the CPU box, whose
            ranks share the cores, a stage computes faster while another waits (`core_speed`)
  DP        ring reduce-scatter / all-reduce of the gradients and all-gather of the weights, exposed
  optimizer the AdamW update is memory-bound: bytes it reads and writes / memory bandwidth
MFU is reported against the BF16 dense peak with the main model's FLOPs per token (`sourcelm.model.flops`,
250 GFLOP for DeepSeek-V3 at 4096), the report's convention; the MTP module's FLOPs are in the time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

from sourcelm.config import ConfigError, ModelConfig
from sourcelm.plan import comms
from sourcelm.plan.cluster import Cluster
from sourcelm.plan.layout import PlanLayout, Resolved, resolve
from sourcelm.plan.memory import RECIPES, RankMemory, rank_memory, rank_params
from sourcelm.plan.model_costs import DTYPE_BYTES, Slot, cut_chunks, model_slots, recompute_flops
from sourcelm.plan.pipeline_sim import PipelineRun, Step, run_schedule


@dataclass(frozen=True)
class Assumptions:
    efficiency: float = 0.5  # achieved FLOP/s of the compute kernels / the dtype's dense peak
    recipe: str = "sourcelm"  # memory.RECIPES
    routing: comms.RoutingStats | None = None  # None: sampled from the model's router (balanced)
    compute_rate: float | None = None  # measured FLOP/s per rank; overrides efficiency x peak (the CPU box)
    # measured FLOP/s per rank of the output head's GEMM and fused loss (main and MTP passes); None: the rate of
    # the rest. On the CPU box one large GEMM runs at several times the rate of the MoE layers' small ones
    head_rate: float | None = None

    def describe(self) -> str:
        rate = (f"measured compute {self.compute_rate / 1e9:.0f} GFLOP/s per rank" if self.compute_rate
                else f"compute at {self.efficiency:.0%} of the dtype's peak")
        if self.head_rate:
            rate += f", the head {self.head_rate / 1e9:.0f} GFLOP/s"
        return f"{rate}; {self.recipe} precision recipe"


@dataclass
class ChunkCost:
    """Seconds for one micro-batch through one chunk on one rank."""

    f_comp: float
    bi_comp: float
    w_comp: float
    f_comm: float
    b_comm: float

    @property
    def f(self) -> float:
        return self.f_comp + self.f_comm

    @property
    def b(self) -> float:
        return self.bi_comp + self.w_comp + self.b_comm


class StageTimes:
    """Durations of schedule steps from per-chunk costs (the simulator's `times`)."""

    def __init__(self, costs: list[ChunkCost], overlap: bool):
        self.costs, self.overlap = costs, overlap

    def duration(self, step: Step) -> float:
        if len(step.tasks) == 2:  # overlapped F and B of two micro-batches: communication hides behind compute
            f, b = self.costs[step.tasks[0].chunk], self.costs[step.tasks[1].chunk]
            if not self.overlap:  # the transfers take the cores the compute needs
                return f.f + b.b
            return max(f.f_comp + b.bi_comp + b.w_comp, f.f_comm + b.b_comm)
        (t,) = step.tasks
        c = self.costs[t.chunk]
        return {"F": c.f, "B": c.b, "Bi": c.bi_comp + c.b_comm, "W": c.w_comp}[t.kind]


@dataclass
class Plan:
    model: ModelConfig
    cluster: Cluster
    res: Resolved
    assumptions: Assumptions
    chunks: list[list[Slot]]
    costs: list[ChunkCost]
    routing: comms.RoutingStats | None
    memory: list[RankMemory]
    time: dict[str, float] = field(default_factory=dict)  # seconds per step, by part
    comm_bytes: dict[str, float] = field(default_factory=dict)  # per rank per step
    pipeline: PipelineRun | None = None
    flops_per_token: float = 0.0  # main model (MFU's numerator)
    train_flops_per_token: float = 0.0  # with MTP

    @property
    def step_time(self) -> float:
        return sum(self.time.values())

    @property
    def tokens_per_step(self) -> int:
        return self.res.layout.global_batch * self.res.layout.seq_len

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens_per_step / self.step_time / self.res.world

    @property
    def mfu(self) -> float:
        """Main-model FLOPs per token x tokens/s per GPU / BF16 dense peak (the report's convention)."""
        peak = self.cluster.peak_flops.get("bf16") or self.cluster.peak(self.res.layout.dtype)
        return self.flops_per_token * self.tokens_per_s_per_gpu / peak

    @property
    def gpu_hours_per_trillion(self) -> float:
        return 1e12 / self.tokens_per_s_per_gpu / 3600

    def days_for(self, tokens: float) -> float:
        return tokens / (self.tokens_per_s_per_gpu * self.res.world) / 86400

    @property
    def worst_memory(self) -> RankMemory:
        return max(self.memory, key=lambda m: m.total)

    @property
    def fits(self) -> bool:
        return self.worst_memory.total <= self.cluster.hbm_bytes


def moe_collectives(dispatcher: str, ep: int, ep_nodes: int, ep_local: int) -> tuple[int, int]:
    """Collective calls the trainer's dispatcher makes per MoE layer and micro-batch: (forward, backward).
    A hop over a one-member group is a local gather, no call. Two-hop forward: per hop a count exchange and
    three row transfers (x, weights, ids) for the dispatch, one for the combine; backward: the combine's
    gradient (x and weights: two) and the dispatch's (one) per hop. Flat: one hop."""
    if ep == 1:
        return 0, 0
    hops = 1 if dispatcher == "flat" else (ep_nodes > 1) + (ep_local > 1)
    return 5 * hops, 3 * hops


def core_speed(cluster: Cluster, world: int, pp: int):
    """None where each rank has a device of its own; on the CPU box (`Cluster.shared_cores`), how fast a pipeline
    rank computes while `busy` of the `pp` pipeline ranks compute, as a multiple of its calibrated rate, which was
    measured with every process busy: the processes of a waiting stage give their share of the cores to the busy
    ones, up to one core each (a rank runs one thread)."""
    if not cluster.shared_cores:
        return None

    def share(processes: int) -> float:
        return min(1.0, cluster.shared_cores / processes)

    return lambda busy: share(busy * world // pp) / share(world)


def chunk_costs(model: ModelConfig, chunks: list[list[Slot]], res: Resolved, cluster: Cluster, a: Assumptions,
                routing: comms.RoutingStats | None, links_overlap: bool) -> list[ChunkCost]:
    lay = res.layout
    tokens = lay.micro_batch * lay.seq_len
    rate = a.compute_rate or a.efficiency * cluster.peak(lay.dtype)
    head_rate = a.head_rate or rate
    row_bytes = comms.row_element_bytes(a.recipe, lay.dtype, model.hidden_size)
    calls_f, calls_b = moe_collectives(lay.dispatcher, lay.ep, res.ep_nodes, min(lay.ep, cluster.gpus_per_node))
    def transfer(elem_bytes: float) -> float:
        """One dispatch or combine of a micro-batch's rows (or its backward, which moves the same rows)."""
        if routing is None:
            return 0.0
        row = model.hidden_size * elem_bytes
        inter = routing.inter_node * tokens * row / cluster.ib_bw
        intra = routing.intra_node * tokens * row / cluster.nvlink_bw
        return max(inter, intra) if links_overlap else inter + intra

    # per MoE layer: forward = dispatch + combine; backward = combine's backward (a dispatch of the output
    # gradients) + dispatch's backward (a combine of the input gradients)
    layer_f = transfer(row_bytes.dispatch) + transfer(row_bytes.combine)
    layer_b = transfer(row_bytes.combine_backward) + transfer(row_bytes.dispatch_backward)
    out = []
    for chunk in chunks:
        n_moe = sum(1 for s in chunk if s.kind in ("moe", "mtp")) if routing is not None else 0
        f_comm = n_moe * (layer_f + calls_f * cluster.link_latency)
        b_comm = n_moe * (layer_b + calls_b * cluster.link_latency)
        if "full" in lay.recompute:  # the recomputed forward dispatches and combines again
            b_comm += f_comm
        redo = sum(recompute_flops(model, s, lay.recompute) for s in chunk)  # recomputation runs in the backward
        # the head's GEMM is 2 x head_matmul FLOPs per token in each of F, Bi and W
        head = 2 * sum(s.head_matmul for s in chunk) * tokens * (1 / head_rate - 1 / rate)
        out.append(ChunkCost(sum(s.f_flops for s in chunk) * tokens / rate + head,
                             (sum(s.bi_flops for s in chunk) + redo) * tokens / rate + head,
                             sum(s.w_flops for s in chunk) * tokens / rate + head, f_comm, b_comm))
    return out


@functools.lru_cache(maxsize=64)
def _slots(model_json: str, seq_len: int) -> tuple[Slot, ...]:
    return tuple(model_slots(ModelConfig(**json.loads(model_json)), seq_len))


@functools.lru_cache(maxsize=256)
def _sampled_routing(model_json: str, ep: int, ranks_per_node: int, dispatcher: str) -> comms.RoutingStats:
    cfg = ModelConfig(**json.loads(model_json))
    return comms.routing_stats(comms.sampled_routing(cfg), ep, ranks_per_node, cfg.n_routed_experts, dispatcher,
                               "sampled (the model's router, balanced)")


def plan_layout(model: ModelConfig, cluster: Cluster, layout: PlanLayout, assumptions: Assumptions = Assumptions(),
                links_overlap: bool | None = None) -> Plan:
    """Everything `sourcelm plan` reports for one layout. Raises ConfigError for a layout that cannot exist."""
    if assumptions.recipe not in RECIPES:
        raise ConfigError(f"plan.recipe = {assumptions.recipe!r}: choose one of {', '.join(map(repr, RECIPES))}")
    res = resolve(layout, model, cluster)
    lay = layout
    links_overlap = cluster.nvlink_bw != cluster.ib_bw if links_overlap is None else links_overlap
    key = json.dumps(dataclasses.asdict(model), sort_keys=True)  # the model, hashable for the caches
    chunks = cut_chunks(list(_slots(key, lay.seq_len)), model, lay.pp, lay.schedule, lay.seq_len,
                        lay.pp_layers)
    routing = assumptions.routing
    if routing is None and lay.ep > 1:
        routing = _sampled_routing(key, lay.ep, min(cluster.gpus_per_node, res.dp), lay.dispatcher)
    costs = chunk_costs(model, chunks, res, cluster, assumptions, routing, links_overlap)
    slots = [s for c in chunks for s in c]
    plan = Plan(model, cluster, res, assumptions, chunks, costs, routing, [],
                flops_per_token=sum(s.train_flops for s in slots if s.kind != "mtp"),
                train_flops_per_token=sum(s.train_flops for s in slots))
    tokens = lay.micro_batch * lay.seq_len
    act_bytes = DTYPE_BYTES[lay.dtype]
    if lay.pp == 1:
        plan.time["compute (micro-batches in turn)"] = res.n_micro * sum(c.f_comp + c.bi_comp + c.w_comp for c in costs)
        plan.time["dispatch/combine (exposed)"] = res.n_micro * sum(c.f_comm + c.b_comm for c in costs)
        held, in_flight = [[0]], [1]
    else:
        p2p = tokens * model.hidden_size * act_bytes / (cluster.ib_bw if res.dp >= cluster.gpus_per_node
                                                         else cluster.nvlink_bw)
        times = StageTimes(costs, cluster.comm_overlaps_compute)
        run = plan.pipeline = run_schedule(lay.schedule, lay.pp, res.n_micro, times, p2p=p2p,
                                           speed=core_speed(cluster, res.world, lay.pp))
        plan.time["pipeline (compute + exposed dispatch/combine)"] = run.makespan - run.bubble
        plan.time["pipeline bubble"] = run.bubble
        held, in_flight = run.chunks_held, run.peak_activations
    rows = 0.0 if routing is None else routing.inter_node + routing.intra_node
    plan.memory = [rank_memory(r, model, chunks, h, k, res, cluster, assumptions.recipe, rows)
                   for r, (h, k) in enumerate(zip(held, in_flight))]
    _step_extras(plan, held)
    return plan


def _step_extras(plan: Plan, held: list[list[int]]) -> None:
    """Data-parallel reduction, optimizer update and bookkeeping, for the busiest pipeline rank; the step's
    communication bytes per rank."""
    res, cluster, lay = plan.res, plan.cluster, plan.res.layout
    params = max((rank_params(plan.chunks, h, lay.ep) for h in held), key=lambda p: p["dense"] + p["experts"])
    sourcelm = plan.assumptions.recipe == "sourcelm"
    # sourcelm: an fp32 all-reduce of the gradients and an fp32 all-gather of the updated masters (ZeRO-1);
    # deepseek: a reduce-scatter of fp32 gradients and an all-gather of bf16 weights
    grad_passes, weight_bytes = (2, 4) if sourcelm else (1, 2)
    gather = lay.zero1 or not sourcelm
    bw = cluster.ib_bw if res.dp > cluster.gpus_per_node else cluster.nvlink_bw  # a stage's ranks span nodes
    dp_bytes = dp_time = 0.0
    for size, members in ((params["dense"], res.dp), (params["experts"], res.expert_replicas)):
        if members <= 1:
            continue
        nbytes = grad_passes * comms.ring_bytes(4 * size, members) + gather * comms.ring_bytes(weight_bytes * size,
                                                                                             members)
        dp_bytes += nbytes
        dp_time += comms.collective_time(nbytes, bw, (grad_passes + gather) * (members - 1), cluster.link_latency)
    plan.time["data-parallel reduction"] = dp_time
    if cluster.mem_bw:
        shards = res.dp if lay.zero1 else 1
        updated = params["dense"] / shards + params["experts"] / (1 if sourcelm else max(res.expert_replicas, 1))
        # AdamW reads and writes the master and both moments and reads the gradient (+ writes a bf16 copy):
        # 30 bytes a parameter with fp32 moments, 22 with the report's bf16 moments
        plan.time["optimizer update"] = updated * (30 if sourcelm else 22) / cluster.mem_bw
    if res.world > 1:  # loss parts, expert counts, gradient norm, byte counters: small all-reduces
        plan.time["per-step bookkeeping collectives"] = 5 * cluster.link_latency
    r = plan.routing
    if r is not None:
        tokens = lay.micro_batch * lay.seq_len * res.n_micro
        n_moe = max(sum(1 for c in h for s in plan.chunks[c] if s.kind in ("moe", "mtp")) for h in held)
        rows = {"inter_node": r.inter_node * tokens * n_moe, "intra_node": r.intra_node * tokens * n_moe}
        moved = comms.step_link_bytes(rows, plan.model.hidden_size,
                                      comms.row_element_bytes(plan.assumptions.recipe, lay.dtype,
                                                              plan.model.hidden_size))
        plan.comm_bytes["dispatch/combine inter-node"] = moved["inter_node_bytes"]
        plan.comm_bytes["dispatch/combine intra-node"] = moved["intra_node_bytes"]
    plan.comm_bytes["data-parallel reduction"] = dp_bytes
    if lay.pp > 1:
        act_bytes = DTYPE_BYTES[lay.dtype]
        # forward activations and backward gradients across each chunk boundary this rank owns
        plan.comm_bytes["pipeline sends"] = (2 * res.n_micro * len(held[0]) * lay.micro_batch * lay.seq_len
                                             * plan.model.hidden_size * act_bytes)
