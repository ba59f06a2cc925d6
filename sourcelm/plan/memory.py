"""Memory per rank: parameters, gradients, optimizer state, activations, caches, buffers; does it fit.

Two precision recipes:
  sourcelm  the trainer as it is (`sourcelm.train.optim`): fp32 master weights on every rank, bf16
            compute copies of the matmul weights (bf16 runs), fp32 gradients (plus the copies' bf16
            gradients), fp32 AdamW moments sharded over DP by ZeRO-1 (dense parameters; an expert's
            moments live with the expert); the routed experts keep their outputs for the routing
            weights' gradient.
  deepseek  the report's (§3.3, reference §2.4): bf16 weights, fp32 gradients, fp32 master weights
            and bf16 moments sharded by ZeRO-1 (dense over the stage's DP ranks, experts over their
            replicas), the routing weight applied to the SwiGLU output (nothing extra kept), FP8
            activation caches when training in FP8, the EMA in host memory.
Activations: one micro-batch's activations of a chunk (`model_costs.activation_terms`) times the
chunks in flight under the schedule (the simulator's peak, Table 2's PP / PP+1), plus one slot's
worth for the backward's working set (gradients of the activations of the slot being differentiated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sourcelm.config import ModelConfig
from sourcelm.plan.cluster import Cluster
from sourcelm.plan.comms import row_element_bytes
from sourcelm.plan.layout import Resolved
from sourcelm.plan.model_costs import DTYPE_BYTES, Slot, activation_bytes

RECIPES = ("sourcelm", "deepseek")


@dataclass
class RankMemory:
    rank: int  # pipeline rank
    chunks: list[int]
    terms: dict[str, float] = field(default_factory=dict)  # bytes

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def largest(self) -> tuple[str, float]:
        return max(self.terms.items(), key=lambda kv: kv[1])


def rank_params(chunks: list[list[Slot]], held: list[int], ep: int) -> dict[str, float]:
    """Parameters one rank holds: dense in full, routed experts / EP; "copied": the matmul weights the
    trainer keeps compute copies of (the routed experts among them, / EP)."""
    slots = [s for c in held for s in chunks[c]]
    dense = sum(s.params - s.expert_params for s in slots)
    experts = sum(s.expert_params for s in slots) / ep
    copied = sum(s.copied - s.expert_params for s in slots) + experts
    return {"dense": dense, "experts": experts, "copied": copied}


def state_terms(p: dict[str, float], res: Resolved, recipe: str) -> dict[str, float]:
    """Weights, gradients and optimizer state in bytes for a rank holding parameters `p`."""
    lay = res.layout
    dense_shards = res.dp if lay.zero1 else 1
    total = p["dense"] + p["experts"]
    if recipe == "sourcelm":
        copies = p["copied"] if lay.dtype != "fp32" else 0
        return {"weights (fp32 masters)": 4 * total, "weights (bf16 compute copies)": 2 * copies,
                "gradients (fp32, + bf16 of the copies)": 4 * total + 2 * copies,
                "optimizer moments (fp32, ZeRO-1 over DP)": 8 * (p["dense"] / dense_shards + p["experts"])}
    expert_shards = res.expert_replicas if lay.zero1 else 1
    out = {"weights (bf16)": 2 * total, "gradients (fp32)": 4 * total,
           "fp32 masters + bf16 moments (ZeRO-1)": 8 * (p["dense"] / dense_shards + p["experts"] / expert_shards)}
    if lay.dtype == "fp8":  # the matmul weights quantised once per step, 128 x 128 blocks with fp32 scales
        out["FP8 weight caches"] = p["copied"] * (1 + 4 / (128 * 128))
    return out


def chunk_activation_bytes(model: ModelConfig, chunk: list[Slot], res: Resolved, recipe: str) -> tuple[float, float]:
    """(activations one micro-batch keeps in this chunk, the largest single slot's), in bytes."""
    lay = res.layout
    tokens = lay.micro_batch * lay.seq_len
    sourcelm = recipe == "sourcelm"  # autocast: the residual stream stays in the masters' fp32
    per_slot = [tokens * activation_bytes(model, s.kind, lay.seq_len, lay.dtype, lay.recompute, lay.attention,
                                          expert_outputs=sourcelm, residual_bytes=4 if sourcelm else None)
                for s in chunk]
    return sum(per_slot), max(per_slot, default=0.0)


def comm_buffers(model: ModelConfig, res: Resolved, recipe: str, rows_per_token: float, held_moe: int) -> float:
    """Receive buffers of one MoE layer's dispatch + combine (two in flight when a schedule overlaps a forward
    and a backward), and the pipeline's send/receive buffers for one micro-batch each way."""
    lay = res.layout
    if not held_moe:
        return 0.0
    tokens = lay.micro_batch * lay.seq_len
    row_bytes = row_element_bytes(recipe, lay.dtype, model.hidden_size)
    # a forward's buffers and a backward's are live together when the schedule overlaps the two
    per_element = (row_bytes.forward + row_bytes.backward if res.chunks_per_rank == 2
                   else max(row_bytes.forward, row_bytes.backward))
    a2a = tokens * rows_per_token * model.hidden_size * per_element
    p2p = 2 * 2 * tokens * model.hidden_size * DTYPE_BYTES[lay.dtype] if lay.pp > 1 else 0.0
    return a2a + p2p


def rank_memory(rank: int, model: ModelConfig, chunks: list[list[Slot]], held: list[int], peak_in_flight: int,
                res: Resolved, cluster: Cluster, recipe: str, rows_per_token: float) -> RankMemory:
    """Every memory term of pipeline rank `rank` holding chunks `held`, `peak_in_flight` chunk activations at once."""
    p = rank_params(chunks, held, res.layout.ep)
    mem = RankMemory(rank, held, state_terms(p, res, recipe))
    acts = [chunk_activation_bytes(model, chunks[c], res, recipe) for c in held]
    mean_chunk = sum(a for a, _ in acts) / len(acts)
    mem.terms[f"activations ({peak_in_flight} chunk(s) of a micro-batch in flight)"] = mean_chunk * peak_in_flight
    mem.terms["backward working set (one slot's activation gradients)"] = max(w for _, w in acts)
    held_moe = sum(1 for c in held for s in chunks[c] if s.kind in ("moe", "mtp"))
    mem.terms["communication buffers"] = comm_buffers(model, res, recipe, rows_per_token, held_moe)
    mem.terms["runtime (outside tensors)"] = cluster.runtime_bytes
    return mem
