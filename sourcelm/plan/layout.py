"""A training layout on a cluster, and the checks that refuse one that cannot exist.

Fields carry the names of the training config where it has them (`parallel.ep`, `schedule.micro_batch`,
...; `parallel.pp` and `parallel.pp_schedule` are the pipeline's), so a refusal names what to change in
either place. Derived: world = nodes x ranks per node; DP = world / PP ranks per pipeline stage (no
tensor parallelism, as DeepSeek-V3); micro-batches per step = global batch / (micro-batch x DP).
Dense parameters are replicated over the DP ranks of a stage (ZeRO-1 shards their optimizer state
there); routed experts are sharded over EP and replicated over DP / EP.
"""

from __future__ import annotations

from dataclasses import dataclass

from sourcelm.config import ConfigError, ModelConfig, check_pp_layers, divisors
from sourcelm.parallel.topology import validate_layout
from sourcelm.plan.cluster import Cluster
from sourcelm.plan.model_costs import RECOMPUTE
from sourcelm.plan.pipeline_sim import SCHEDULES, check_schedule

DTYPES = ("fp32", "bf16", "fp8")
ATTENTION = ("flash", "materialised")


@dataclass(frozen=True)
class PlanLayout:
    pp: int = 1  # parallel.pp: pipeline ranks
    ep: int = 1  # parallel.ep
    schedule: str = "1f1b"  # parallel.pp_schedule (one of pipeline_sim.SCHEDULES); no effect at pp = 1
    pp_layers: tuple[int, ...] = ()  # parallel.pp_layers: main layers per chunk; (): the FLOP-balanced cut
    micro_batch: int = 1  # schedule.micro_batch: sequences per micro-batch on one rank
    global_batch: int = 8  # schedule.global_batch: sequences per optimizer step
    seq_len: int = 4096  # data.seq_len
    dtype: str = "bf16"  # train.dtype: "fp32", "bf16" or "fp8" (FP8 matmuls and activation caches)
    recompute: tuple[str, ...] = ()  # plan.recompute: see model_costs.RECOMPUTE
    zero1: bool = True  # parallel.zero1
    dispatcher: str = "two_hop"  # parallel.dispatcher
    attention: str = "flash"  # plan.attention: "flash" or "materialised" (the CPU kernels keep probabilities)

    def describe(self) -> str:
        sched = f" {self.schedule}" if self.pp > 1 else ""
        rc = f", recompute {'+'.join(self.recompute)}" if self.recompute else ""
        return (f"PP {self.pp}{sched} x EP {self.ep}, micro-batch {self.micro_batch} x {self.seq_len}, global batch "
                f"{self.global_batch}, {self.dtype}{rc}{', ZeRO-1' if self.zero1 else ''}")


@dataclass(frozen=True)
class Resolved:
    """A validated layout with what follows from it."""

    layout: PlanLayout
    world: int
    dp: int  # ranks per pipeline stage
    n_micro: int  # micro-batches per step, per pipeline
    chunks: int  # stage chunks the model is cut into (2 x pp for DualPipeV)
    ep_nodes: int  # nodes one EP group spans
    expert_replicas: int  # ranks holding the same expert (dp / ep)

    @property
    def chunks_per_rank(self) -> int:
        return 2 if self.layout.pp > 1 and self.layout.schedule in ("dualpipe", "dualpipev") else 1


def resolve(layout: PlanLayout, model: ModelConfig, cluster: Cluster) -> Resolved:
    """Checks that the layout can exist on the cluster; raises ConfigError naming the field and the fix."""
    lay = layout
    world = cluster.world
    for name in ("pp", "ep", "micro_batch", "global_batch", "seq_len"):
        if getattr(lay, name) <= 0:
            raise ConfigError(f"{_field(name)} = {getattr(lay, name)} must be positive")
    if lay.dtype not in DTYPES:
        raise ConfigError(f"train.dtype = {lay.dtype!r}: choose one of {', '.join(map(repr, DTYPES))}")
    if lay.attention not in ATTENTION:
        raise ConfigError(f"plan.attention = {lay.attention!r}: choose one of {', '.join(map(repr, ATTENTION))}")
    for r in lay.recompute:
        if r not in RECOMPUTE:
            raise ConfigError(f"plan.recompute = {r!r}: choose among {', '.join(map(repr, RECOMPUTE))}")
    if lay.dispatcher not in ("flat", "two_hop"):
        raise ConfigError(f"parallel.dispatcher = {lay.dispatcher!r}: choose 'flat' or 'two_hop'")
    if lay.seq_len > model.max_position_embeddings:
        raise ConfigError(f"data.seq_len = {lay.seq_len} exceeds model.max_position_embeddings = "
                          f"{model.max_position_embeddings}")
    if world % lay.pp:
        raise ConfigError(f"parallel.pp = {lay.pp} must divide the {world} ranks ({cluster.nodes} nodes x "
                          f"{cluster.gpus_per_node}); choose among {divisors(world)} or change --nodes")
    if lay.pp > 1 and lay.schedule not in SCHEDULES:
        raise ConfigError(f"parallel.pp_schedule = {lay.schedule!r}: choose one of {', '.join(map(repr, SCHEDULES))}")
    chunks = lay.pp * (2 if lay.pp > 1 and lay.schedule == "dualpipev" else 1)
    if chunks > model.num_hidden_layers:  # the trainer balances uneven cuts, but a chunk needs a layer
        most = model.num_hidden_layers // (chunks // lay.pp)
        raise ConfigError(
            f"parallel.pp = {lay.pp} cuts the model into {chunks} chunks"
            f"{' (dualpipev: 2 per rank)' if chunks != lay.pp else ''} but it has {model.num_hidden_layers} decoder "
            f"layers; choose parallel.pp among {[d for d in divisors(world) if d <= most]}")
    check_pp_layers(lay.pp_layers, lay.pp, chunks, model.num_hidden_layers)
    dp = world // lay.pp
    if model.n_routed_experts % lay.ep:
        raise ConfigError(f"parallel.ep = {lay.ep} must divide model.n_routed_experts = {model.n_routed_experts}; "
                          f"choose among {divisors(model.n_routed_experts)}")
    if dp % lay.ep:
        raise ConfigError(
            f"parallel.ep = {lay.ep} must divide the {dp} ranks of a pipeline stage (world {world} / parallel.pp "
            f"{lay.pp}); choose among {[d for d in divisors(dp) if model.n_routed_experts % d == 0]}")
    # EP groups whole nodes or inside one, router groups inside nodes: the trainer's own rules
    validate_layout(dp, min(cluster.gpus_per_node, dp), lay.ep, model.n_routed_experts, model.n_group)
    quantum = lay.micro_batch * dp
    if lay.global_batch % quantum:
        raise ConfigError(
            f"schedule.global_batch = {lay.global_batch} must be a multiple of schedule.micro_batch x DP = "
            f"{lay.micro_batch} x {dp}; use a global batch of {max(1, lay.global_batch // quantum) * quantum} or "
            f"change schedule.micro_batch")
    n_micro = lay.global_batch // quantum
    if lay.pp > 1:
        check_schedule(lay.schedule, lay.pp, n_micro)
    ep_local = min(lay.ep, cluster.gpus_per_node)
    return Resolved(lay, world, dp, n_micro, chunks, lay.ep // ep_local, dp // lay.ep)


_FIELDS = {"pp": "parallel.pp", "ep": "parallel.ep", "micro_batch": "schedule.micro_batch",
           "global_batch": "schedule.global_batch", "seq_len": "data.seq_len"}


def _field(name: str) -> str:
    return _FIELDS.get(name, name)
