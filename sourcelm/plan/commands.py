"""`sourcelm plan CONFIG [--cluster h800] [layout options] [--search] [--json]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="size a training run on a cluster: memory, communication, step time, cost",
                       description="Predict memory per GPU, communication and time per step, tokens/s, MFU and "
                                   "GPU-hours of a layout; --search ranks the layouts that fit.")
    p.add_argument("config", help="preset (tiny, small, deepseek-v3-671b), TOML file, or HF model dir / config.json")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides (presets and TOML only)")
    p.add_argument("--cluster", default="h800", help="h800, h100, h200, a cluster TOML file, or 'cpu' (this machine, "
                                                     "measured, with short training runs of a 2-layer cut of the "
                                                     "model, and with --pp one of a layer per stage chunk under "
                                                     "the schedule; a minute or two)")
    p.add_argument("--nodes", type=int, help="node count (default: the cluster file's; on cpu: nproc / ranks-per-node)")
    p.add_argument("--nproc", type=int, default=1, help="cpu: local processes (as `sourcelm train --nproc`)")
    p.add_argument("--ranks-per-node", type=int, default=0, help="cpu: pretend node size (default: all processes)")
    p.add_argument("--pp", type=int, default=1, help="parallel.pp: pipeline ranks")
    p.add_argument("--schedule", default="dualpipev", help="parallel.pp_schedule: 1f1b, zb1p, dualpipe, dualpipev")
    p.add_argument("--pp-layers", default="", help="parallel.pp_layers: main layers per chunk, comma-separated "
                                                    "(default: the FLOP-balanced cut)")
    p.add_argument("--ep", type=int, help="parallel.ep (default: the config's)")
    p.add_argument("--micro-batch", type=int, help="schedule.micro_batch (default: the config's)")
    p.add_argument("--global-batch", type=int, help="schedule.global_batch (default: the config's)")
    p.add_argument("--seq-len", type=int, help="data.seq_len (default: the config's; 4096 for HF configs)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp8"], help="compute dtype (default: the config's train.dtype)")
    p.add_argument("--recompute", default="", help="comma-separated: norm_up_proj, swiglu, full")
    p.add_argument("--no-zero1", action="store_true", help="keep the full optimizer state on every rank")
    p.add_argument("--recipe", choices=["sourcelm", "deepseek"], default="sourcelm",
                   help="precision/memory recipe: this trainer's, or the report's (bf16 weights, sharded fp32 masters)")
    p.add_argument("--efficiency", type=float, default=0.5,
                   help="fraction of the dtype's dense peak the compute kernels reach (GPU clusters; cpu measures it)")
    p.add_argument("--tokens", type=float, help="token budget: days and GPU-hours to train on it")
    p.add_argument("--search", action="store_true", help="rank every layout that fits by predicted step time")
    p.add_argument("--top", type=int, default=10, help="--search: how many layouts to show")
    p.add_argument("--max-micro-batch", type=int, default=4, help="--search: largest micro-batch to try")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_plan, intermixed=True)


def _model_and_defaults(source: str, overrides: list[str]):
    """(ModelConfig, defaults for the layout from the training config, or None for an HF config)."""
    from sourcelm.config import load_config, load_model_config

    path = Path(source)
    hf_json = path / "config.json" if path.is_dir() else path
    if hf_json.suffix == ".json" and hf_json.exists() and "model_type" in json.loads(hf_json.read_text()):
        return load_model_config(hf_json), None
    return (full := load_config(source, overrides)).model, full


def _layout(args, defaults, world: int, is_cpu: bool):
    from sourcelm.plan.layout import PlanLayout

    dtype = args.dtype
    if dtype is None and defaults is not None:
        dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(defaults.train.dtype)
    if dtype is None:  # "auto": what the trainer would pick here (bf16 on a GPU)
        if is_cpu:
            import torch

            from sourcelm.kernels.hardware import resolve_dtype

            dtype = {"float32": "fp32", "bfloat16": "bf16"}[resolve_dtype("auto", torch.device("cpu"))]
        else:
            dtype = "bf16"
    d = defaults
    return PlanLayout(
        pp=args.pp, schedule=args.schedule, pp_layers=tuple(int(n) for n in args.pp_layers.split(",") if n),
        ep=args.ep or (d.parallel.ep if d else 1),
        micro_batch=args.micro_batch or (d.schedule.micro_batch if d else 1),
        global_batch=args.global_batch or (d.schedule.global_batch if d else world),
        seq_len=args.seq_len or (d.data.seq_len if d else 4096), dtype=dtype,
        recompute=tuple(r for r in args.recompute.split(",") if r), zero1=not args.no_zero1,
        dispatcher=d.parallel.dispatcher if d else "two_hop",
        # the CPU kernels keep the attention probabilities; GPU kernels are flash-style
        attention="materialised" if is_cpu else "flash")


def run_plan(args) -> int:
    from sourcelm.plan.cluster import load_cluster
    from sourcelm.plan.estimate import Assumptions, plan_layout
    from sourcelm.plan.output import plan_dict, print_plan, print_search
    from sourcelm.plan.search import fixes, search

    model, defaults = _model_and_defaults(args.config, args.overrides)
    is_cpu = args.cluster == "cpu"
    if is_cpu:
        from sourcelm.plan.measure import measure_cpu_box

        rpn = args.ranks_per_node or args.nproc
        lay = _layout(args, defaults, args.nproc, True)
        cluster, rate, head = measure_cpu_box(args.nproc, rpn, model, lay.ep, lay.micro_batch, lay.seq_len,
                                              lay.dtype, lay.pp, lay.schedule, lay.global_batch)
        assumptions = Assumptions(compute_rate=rate, head_rate=head, recipe=args.recipe)
    else:
        cluster = load_cluster(args.cluster).with_nodes(args.nodes)
        lay = _layout(args, defaults, cluster.world, False)
        assumptions = Assumptions(efficiency=args.efficiency, recipe=args.recipe)
    if args.search:
        result = search(model, cluster, lay, assumptions, top=args.top, max_micro_batch=args.max_micro_batch)
        if args.json:
            print(json.dumps({"fitting": [plan_dict(p, args.tokens) for p in result.fitting],
                              "not_fitting": result.not_fitting, "impossible": result.impossible}, indent=2))
        else:
            print_search(result, args.config)
        return 0 if result.fitting else 1
    plan = plan_layout(model, cluster, lay, assumptions)
    found = [] if plan.fits else fixes(model, cluster, lay, assumptions)
    if args.json:
        d = plan_dict(plan, args.tokens)
        d["memory"]["fixes"] = [{"change": label, "worst_total_bytes": p.worst_memory.total} for label, p in found]
        print(json.dumps(d, indent=2, default=float))
    else:
        print_plan(plan, args.config, args.tokens, found)
    return 0 if plan.fits else 1
