"""A plan as JSON-ready data and as tables."""

from __future__ import annotations

import math

from sourcelm.plan import comms
from sourcelm.plan.estimate import Plan


def _finite(x: float) -> float | None:
    """JSON has no infinity: a link a one-process "cluster" never uses has no bandwidth to report."""
    return x if math.isfinite(x) else None


def report_figures(plan: Plan) -> dict:
    """The report's node-limited routing figures (§3.2.2) on this cluster's links; none on a single node."""
    cl = plan.cluster
    if cl.nodes < 2:
        return {"experts_per_node_at_no_extra_cost": None, "max_experts_at_same_cost": None}
    return {"experts_per_node_at_no_extra_cost": comms.experts_per_node_at_no_extra_cost(cl.nvlink_bw, cl.ib_bw),
            "max_experts_at_same_cost": comms.max_experts_at_same_cost(plan.model.topk_group, cl.nvlink_bw, cl.ib_bw)}


def plan_dict(plan: Plan, tokens: float | None = None) -> dict:
    lay, res, cl = plan.res.layout, plan.res, plan.cluster
    worst = plan.worst_memory
    out = {
        "model": {"flops_per_token": plan.flops_per_token, "train_flops_per_token": plan.train_flops_per_token},
        "cluster": {"name": cl.name, "nodes": cl.nodes, "gpus_per_node": cl.gpus_per_node, "world": cl.world,
                    "memory_bytes": cl.hbm_bytes, "peak_flops": cl.peak_flops, "nvlink_bw": _finite(cl.nvlink_bw),
                    "ib_bw": _finite(cl.ib_bw), "link_latency": cl.link_latency, "sources": cl.sources},
        "layout": {"pp": lay.pp, "schedule": lay.schedule if lay.pp > 1 else None, "ep": lay.ep, "dp": res.dp,
                   "micro_batch": lay.micro_batch, "micro_batches_per_step": res.n_micro,
                   "global_batch": lay.global_batch, "seq_len": lay.seq_len, "dtype": lay.dtype,
                   "recompute": list(lay.recompute), "zero1": lay.zero1, "dispatcher": lay.dispatcher,
                   "chunks": [[s.name for s in c] for c in plan.chunks]},
        "assumptions": {"description": plan.assumptions.describe(), "efficiency": plan.assumptions.efficiency,
                        "compute_rate": plan.assumptions.compute_rate, "head_rate": plan.assumptions.head_rate,
                        "recipe": plan.assumptions.recipe},
        "memory": {"fits": plan.fits, "worst_rank": worst.rank, "worst_total_bytes": worst.total,
                   "capacity_bytes": cl.hbm_bytes, "largest_term": worst.largest[0],
                   "per_rank": [{"rank": m.rank, "chunks": m.chunks, "total_bytes": m.total, "terms": m.terms}
                                for m in plan.memory]},
        "communication_bytes_per_rank_per_step": plan.comm_bytes,
        "time_s": dict(plan.time),
        "step_time_s": plan.step_time,
        "tokens_per_s_per_gpu": plan.tokens_per_s_per_gpu,
        "mfu_bf16": plan.mfu,
        "gpu_hours_per_trillion_tokens": plan.gpu_hours_per_trillion,
        "report_figures": report_figures(plan),
    }
    if plan.routing is not None:
        r = plan.routing
        out["routing"] = {"source": r.source, "inter_node_rows_per_token": r.inter_node,
                          "intra_node_rows_per_token": r.intra_node, "nodes_per_token": r.nodes_per_token,
                          "ranks_per_token": r.ranks_per_token}
    if plan.pipeline is not None:
        run = plan.pipeline
        out["pipeline"] = {"makespan_s": run.makespan, "bubble_s": run.bubble, "idle_s_per_rank": run.idle,
                           "peak_chunk_activations_per_rank": run.peak_activations,
                           "chunks_per_rank": run.chunks_held}
    if tokens:
        out["budget"] = {"tokens": tokens, "days": plan.days_for(tokens),
                         "gpu_hours": tokens / plan.tokens_per_s_per_gpu / 3600}
    return out


def _gb(x: float) -> str:
    return f"{x / 1e9:,.2f} GB"


def print_plan(plan: Plan, title: str, tokens: float | None = None, fixes: list | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    d = plan_dict(plan, tokens)
    lay = plan.res.layout
    con.print(f"[bold]{title}[/bold] on {plan.cluster.describe()}")
    con.print(f"layout: {lay.describe()}; DP {plan.res.dp}, {plan.res.n_micro} micro-batch(es) per step")
    con.print(f"assumptions: {plan.assumptions.describe()}")
    if plan.routing is not None:
        r = plan.routing
        con.print(f"routing ({r.source}): {r.nodes_per_token:.2f} nodes and {r.ranks_per_token:.2f} ranks per token; "
                  f"dispatch rows per token {r.inter_node:.2f} inter-node, {r.intra_node:.2f} intra-node")
    worst = plan.worst_memory
    mem = Table(title=f"memory per rank (pipeline rank {worst.rank}, the fullest)")
    mem.add_column("term")
    mem.add_column("bytes", justify="right")
    for k, v in sorted(worst.terms.items(), key=lambda kv: -kv[1]):
        mem.add_row(k, _gb(v))
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    mem.add_row(f"total ({verdict} in {_gb(plan.cluster.hbm_bytes)})", _gb(worst.total))
    con.print(mem)
    if not plan.fits:
        name, size = worst.largest
        con.print(f"[bold red]does not fit[/bold red]: the largest term is {name} ({_gb(size)})")
        for label, p in fixes or []:
            con.print(f"  fits with {label}: {_gb(p.worst_memory.total)}, step {p.step_time:.3g} s")
        if not fixes:
            con.print("  no single change of EP, PP, recomputation, micro-batch or node count makes it fit")
    t = Table(title="time per step")
    t.add_column("part")
    t.add_column("seconds", justify="right")
    for k, v in plan.time.items():
        t.add_row(k, f"{v:.4g}")
    t.add_row("step", f"{plan.step_time:.4g}")
    con.print(t)
    c = Table(title="communication per rank per step")
    c.add_column("what")
    c.add_column("bytes", justify="right")
    for k, v in plan.comm_bytes.items():
        c.add_row(k, _gb(v))
    con.print(c)
    con.print(f"tokens/s per GPU {d['tokens_per_s_per_gpu']:,.0f}; MFU {d['mfu_bf16']:.1%} of the BF16 peak "
              f"({plan.flops_per_token / 1e9:.1f} GFLOP per token, main model); "
              f"{d['gpu_hours_per_trillion_tokens']:,.0f} GPU-hours per trillion tokens")
    if tokens:
        b = d["budget"]
        con.print(f"{tokens:.3g} tokens: {b['days']:.1f} days on {plan.res.world} GPUs, "
                  f"{b['gpu_hours']:,.0f} GPU-hours")
    f = d["report_figures"]
    if f["max_experts_at_same_cost"] is not None:
        con.print(f"node-limited routing on these links: {f['experts_per_node_at_no_extra_cost']:.2f} experts per node "
                  f"at no extra cost, up to {f['max_experts_at_same_cost']} experts per token over "
                  f"{plan.model.topk_group} nodes at the cost of the IB hop (report §3.2.2)")


def print_search(result, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"{title}: {len(result.fitting)} fastest layouts that fit "
                    f"({result.not_fitting} do not fit, {result.impossible} cannot exist)")
    for col in ("#", "PP", "schedule", "EP", "micro-batch", "recompute", "memory", "step s", "tok/s/GPU", "MFU"):
        t.add_column(col)
    for i, p in enumerate(result.fitting, 1):
        lay = p.res.layout
        t.add_row(str(i), str(lay.pp), lay.schedule if lay.pp > 1 else "-", str(lay.ep), str(lay.micro_batch),
                  "+".join(lay.recompute) or "-", _gb(p.worst_memory.total), f"{p.step_time:.3g}",
                  f"{p.tokens_per_s_per_gpu:,.0f}", f"{p.mfu:.1%}")
    con.print(t)
