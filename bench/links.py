"""Dispatch/combine on links shaped like IB and NVLink (one network namespace per pretend node).

Three parts, all on `--links` (default ib=200mbit,nvlink=640mbit: the report's 3.2 : 1, slow enough that
the links, not this machine's 2 shared cores, set the pace):
  1. flat, two-hop and chunked two-hop at 2 x 2 and 2 x 4 ranks: forward dispatch + combine time (median,
     slowest rank), bytes per link class, and the bound: the busiest node's bytes on each link class over
     that link's rate, both links busy at once. Routes from the model's group-limited router (M = 2).
  2. the chunk size the chunked dispatcher measured, with its time at the other sizes it tried.
  3. the report's "3.2 experts per node": 2 nodes x 8 ranks, every token sent to the other node (node
     limit M = 1) and to e experts there, on e distinct ranks other than its forwarder (e = 1, 2, 3, 4, 6):
     a token crosses IB once and NVLink e times with two-hop, IB e times with flat. Dispatch time plotted
     (bench/RESULTS_links.png) with the knee: the largest e whose two-hop time is within 15 % of e = 1.

    sudo .venv/bin/python bench/links.py          # about 3 minutes on 2 cores; needs network namespaces
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("flat", "two_hop", "two_hop_chunked")
EXPERTS_PER_NODE = (1, 2, 3, 4, 6)
KNEE_TOLERANCE = 1.15


def _time_kind(d, x, idx, w, repeats, with_combine=True):
    """Median seconds of `repeats` forward dispatches (+ combines), after one warm-up; this rank's times."""
    import torch.distributed as dist

    times = []
    for it in range(repeats + 1):
        dist.barrier()
        d.stats.reset()
        t0 = time.perf_counter()
        with torch.no_grad():
            recv_x, _, _, handle = d.dispatch(x, idx, w)
            if with_combine:
                d.combine(recv_x, handle)
        if it:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), d.stats.reset()


def layouts_worker(rank, world, rpn, n_tokens, hidden, k, m, repeats):
    from sourcelm.parallel.dispatch import make_dispatcher
    from sourcelm.parallel.topology import build_topology

    sys.path.insert(0, str(ROOT))
    from bench.dispatch import _routes

    n_nodes, n_experts = world // rpn, 4 * world
    topo = build_topology(world, rpn, n_experts, n_nodes, m)
    x, idx, w = _routes((n_experts, k, m, n_nodes), n_tokens, hidden, rank)
    out = {}
    for kind in KINDS:
        d = make_dispatcher(kind, topo)
        if kind == "two_hop_chunked":
            d.dispatch(x, idx, w)  # measures its chunk size first
            out["chunk"] = (d.chunk_rows, dict(d.tuning))
        out[kind] = _time_kind(d, x, idx, w, repeats)
    return out


def experts_worker(rank, world, rpn, n_tokens, hidden, e, repeats):
    """Synthetic routes: every token goes to the other node only, to e ranks other than its forwarder."""
    from sourcelm.parallel.dispatch import make_dispatcher
    from sourcelm.parallel.topology import build_topology

    topo = build_topology(world, rpn, world)  # one expert per rank
    g = torch.Generator().manual_seed(rank)
    other = (1 - rank // rpn) * rpn
    peers = torch.tensor([j for j in range(rpn) if j != rank % rpn])  # local indices other than the forwarder
    idx = torch.stack([other + peers[torch.randperm(rpn - 1, generator=g)[:e]] for _ in range(n_tokens)])
    x = torch.randn(n_tokens, hidden, generator=g)
    w = torch.rand(n_tokens, e, generator=g)
    out = {}
    for kind in KINDS:
        d = make_dispatcher(kind, topo)
        if kind == "two_hop_chunked":
            d.dispatch(x, idx, w)
            out["chunk"] = d.chunk_rows
        out[kind] = _time_kind(d, x, idx, w, repeats, with_combine=False)
    return out


def node_bytes(per_rank, kind, rpn):
    """(largest IB bytes of one node, largest NVLink bytes of one node) over the nodes."""
    nodes = range(len(per_rank) // rpn)
    ib = max(sum(per_rank[r][kind][1]["inter_node_bytes"] for r in range(n * rpn, (n + 1) * rpn)) for n in nodes)
    nv = max(sum(per_rank[r][kind][1]["intra_node_bytes"] for r in range(n * rpn, (n + 1) * rpn)) for n in nodes)
    return ib, nv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--links", default="ib=200mbit,nvlink=640mbit")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per rank (parts 1 and 2)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--expert-tokens", type=int, default=256, help="tokens per rank (part 3)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS_links.md"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from sourcelm.parallel.links import LinkSpecError, parse_links
    from sourcelm.parallel.local_ranks import run_ranks
    from sourcelm.parallel.netns import setup_problem

    try:
        spec = parse_links(args.links)
    except LinkSpecError as e:
        print(e)
        return 2
    problem = setup_problem()
    if problem:
        print(f"bench/links.py needs shaped links: {problem}")
        return 2
    t_start, load = time.time(), os.getloadavg()[0]
    row = args.hidden * 4  # fp32 rows

    lines = ["| nodes x ranks | dispatcher | dispatch + combine ms | IB MB (all ranks) | NVLink MB (all ranks) | "
             "bound ms (IB / NVLink) | time / bound |", "|" + "---|" * 7]
    chunk_lines = []
    for world, rpn in ((4, 2), (8, 4)):
        res = run_ranks(layouts_worker, world, rpn, args.tokens, args.hidden, 8, 2, args.repeats, timeout=900,
                        ranks_per_node=rpn, links=spec)
        for kind in KINDS:
            t = max(r[kind][0] for r in res)
            ib_all = sum(r[kind][1]["inter_node_bytes"] for r in res) / 1e6
            nv_all = sum(r[kind][1]["intra_node_bytes"] for r in res) / 1e6
            ib, nv = node_bytes(res, kind, rpn)
            b_ib, b_nv = ib / spec.ib_bytes, nv / spec.nvlink_bytes
            lines.append(f"| {world // rpn} x {rpn} | {kind} | {t * 1e3:.0f} | {ib_all:.2f} | {nv_all:.2f} | "
                         f"{max(b_ib, b_nv) * 1e3:.0f} ({b_ib * 1e3:.0f} / {b_nv * 1e3:.0f}) | "
                         f"{t / max(b_ib, b_nv):.2f} |")
        chosen, tried = res[0]["chunk"]
        chunk_lines.append(f"| {world // rpn} x {rpn} | {chosen} | " + ", ".join(
            f"{c}: {s * 1e3:.0f}" for c, s in sorted(tried.items())) + " |")
        print("\n".join(lines[-3:]), flush=True)

    exp_rows, curves = [], {kind: [] for kind in KINDS}
    bounds = {kind: [] for kind in KINDS}
    for e in EXPERTS_PER_NODE:
        res = run_ranks(experts_worker, 16, 8, args.expert_tokens, args.hidden, e, args.repeats, timeout=900,
                        ranks_per_node=8, links=spec)
        cells = []
        for kind in KINDS:
            t = max(r[kind][0] for r in res)
            ib, nv = node_bytes(res, kind, 8)
            bound = max(ib / spec.ib_bytes, nv / spec.nvlink_bytes)
            curves[kind].append(t)
            bounds[kind].append(bound)
            cells.append(f"{t * 1e3:.0f} ({bound * 1e3:.0f})")
        exp_rows.append(f"| {e} | " + " | ".join(cells) + f" | {res[0]['chunk']} |")
        print(exp_rows[-1], flush=True)

    def knee(ts):
        ok = [e for e, t in zip(EXPERTS_PER_NODE, ts) if t <= KNEE_TOLERANCE * ts[0]]
        return max(ok)

    def slope(ts, a, b):  # ms per expert between EXPERTS_PER_NODE[a] and [b]
        return (ts[b] - ts[a]) * 1e3 / (EXPERTS_PER_NODE[b] - EXPERTS_PER_NODE[a])

    png = Path(args.out).with_suffix(".png")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, color in zip(KINDS, ("tab:red", "tab:blue", "tab:green")):
        ax.plot(EXPERTS_PER_NODE, [t * 1e3 for t in curves[kind]], "o-", color=color, label=f"{kind} (measured)")
        ax.plot(EXPERTS_PER_NODE, [b * 1e3 for b in bounds[kind]], ":", color=color, label=f"{kind} (bytes / rate)")
    ax.axvline(spec.ratio, color="grey", ls="--", lw=1, label=f"NVLink : IB = {spec.ratio:.1f}")
    ax.set_xlabel("experts per node per token (node limit M = 1)")
    ax.set_ylabel("dispatch ms (slowest rank, median)")
    ax.set_title(f"2 nodes x 8 ranks, {args.links}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)

    k_two, k_chunk, k_flat = knee(curves["two_hop"]), knee(curves["two_hop_chunked"]), knee(curves["flat"])
    cmd = "sudo .venv/bin/python bench/links.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    text = "\n".join([
        "# Dispatch/combine on shaped links (IB and NVLink at 3.2 : 1)", "",
        f"Command: `{cmd}` ({time.time() - t_start:.0f} s, {os.cpu_count()} cores shared with other work, load "
        f"average {load:.1f} at the start; 1 torch thread per rank; gloo over TCP).", "",
        f"Links: `{spec}` (NVLink : IB = {spec.ratio:.2f}). Each pretend node is a network namespace; its link to "
        "the other nodes is a veth pair to a bridge, shaped with tc tbf in both directions; traffic between its "
        "ranks crosses the namespace's loopback, shaped to the NVLink rate (sourcelm/parallel/netns.py). One link "
        "per node stands for all its GPUs' NICs, loopback for its NVLink fabric. The rates are low on purpose: "
        "the links, not the 2 CPU cores, must be the bottleneck; rows are fp32, "
        f"{args.hidden} wide ({row} bytes).", "",
        "## Findings", "",
        f"- Two-hop dispatch time stays within {round((KNEE_TOLERANCE - 1) * 100)} % of its 1-expert time up to "
        f"**{k_two} experts per node** (chunked: {k_chunk}); flat all-to-all only up to {k_flat}. The report's "
        f"figure is NVLink : IB = {spec.ratio:.1f} experts per node; the two-hop bytes / rate bound stays flat up to "
        f"{knee(bounds['two_hop'])}.",
        "- Slope of dispatch time, ms per extra expert per node, below the ratio (e 1 -> 3) and above it (e 3 -> 6): "
        + "; ".join(f"{kind} {slope(curves[kind], 0, 2):.0f} then {slope(curves[kind], 2, 4):.0f}" for kind in KINDS)
        + f" (bytes / rate bound of two-hop: {slope(bounds['two_hop'], 0, 2):.0f} then "
        f"{slope(bounds['two_hop'], 2, 4):.0f}; of flat: {slope(bounds['flat'], 0, 2):.0f} then "
        f"{slope(bounds['flat'], 2, 4):.0f}).",
        "- Time / bound (part 1) says how close each dispatcher gets to its links' rate (TCP/IP headers alone cost "
        "a few per cent; the count exchanges and, unchunked, the hops one after the other add to it).", "",
        "## 1. Dispatch + combine, routes from the model's router (K 8, M 2, 4 experts per rank)", "",
        f"{args.tokens} tokens per rank. MB: hidden-state bytes sent over each link class by one dispatch + combine, "
        "summed over ranks. Bound: the busiest node's IB bytes / IB rate and NVLink bytes / NVLink rate; the larger "
        "is the time with both links busy all the time.", "", *lines, "",
        "## 2. The measured chunk size", "",
        "On its first dispatch the chunked dispatcher times dispatch + combine at 1, 1/2, 1/4, 1/8, 1/16 of the "
        "largest per-(source, node) row count and keeps the fastest (slowest rank, best of 2).", "",
        "| nodes x ranks | chosen rows per chunk | tried (rows: ms) |", "|---|---|---|", *chunk_lines, "",
        "## 3. Experts per node (2 nodes x 8 ranks, M = 1)", "",
        f"{args.expert_tokens} tokens per rank, each to the other node and to e experts there on e distinct ranks "
        "other than its forwarder (synthetic routes: one expert per rank). Forward dispatch only; ms, with the "
        "bytes / rate bound in brackets.", "",
        "| experts per node | " + " | ".join(KINDS) + " | chunk rows |", "|" + "---|" * (len(KINDS) + 2),
        *exp_rows, "", f"![dispatch time vs experts per node]({png.name})", ""])
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
