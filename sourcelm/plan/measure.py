"""This machine as a cluster: measured, because the CPU trainer runs on what these numbers describe.

  peak          the fastest square matmul's FLOP/s for the compute dtype (`sourcelm.train.metrics.measure_cpu_peak`)
  memory copy   bytes/s of copying a large tensor (the optimizer's update is memory-bound)
  links         gloo all-to-all between local processes, pairs of ranks at once as the dispatcher's hops
                run: latency (tiny messages) and bandwidth (4 MB per peer). Every "link" is the loopback.
  compute rate  the model cut down to its dense layers and one MoE layer (no MTP), trained by `sourcelm
                train` in the layout to predict (processes, pretend nodes, EP, micro-batch): FLOPs outside the head per
                second of its step once the plan's communication, update and head times are taken out; the whole
                model's compute time is then its FLOPs / this rate
  head rate     the same cut trained again with a 256-token vocabulary: the head's FLOPs saved / the time saved
  runtime       that run's peak resident size less the plan's tensors for it: the interpreter, torch's code
                pages, kernel caches, allocator slack (at least an idle process's size); for a pipeline, the
                same from a cut with a layer per stage chunk trained under the schedule
Ranks share the cores: with more processes than cores each gets cores / processes of one thread (the peak and
the copy bandwidth are scaled so; the calibration run shares them for real, every rank busy). A pipeline's ranks
are not all busy: while some wait, the others get their share (`Cluster.shared_cores`, the planner's `core_speed`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sourcelm.config import ModelConfig
from sourcelm.plan.cluster import Cluster

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def cores() -> int:
    return len(os.sched_getaffinity(0))


def threads_per_rank(ranks: int) -> int:
    """What the launcher gives each rank: all cores for one process, one thread each for several."""
    return cores() if ranks == 1 else 1


def core_share(ranks: int) -> float:
    """The fraction of its thread's time a rank gets when processes outnumber cores."""
    return min(1.0, cores() / ranks) if ranks > 1 else 1.0


class _Threads:
    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def matmul_peak(dtype: str, threads: int) -> float:
    from sourcelm.train.metrics import measure_cpu_peak

    with _Threads(threads):
        return measure_cpu_peak(DTYPES[dtype])


def memcpy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes copied per second (each byte read once and written once)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def reduced_model(cfg: ModelConfig) -> ModelConfig:
    """The model's dense layers and one MoE layer, no MTP: the shapes of every kind of block, small."""
    return dataclasses.replace(cfg, num_hidden_layers=cfg.first_k_dense_replace + 1, num_nextn_predict_layers=0)


def write_token_shard(root: Path, vocab: int, tokens: int = 200_000, seed: int = 0) -> Path:
    """Random documents as a token shard the trainer reads (measurements and benchmarks need no corpus)."""
    import numpy as np

    from sourcelm.tokens.indexed import ShardWriter

    rng = np.random.default_rng(seed)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    with ShardWriter(root / "train" / "shard_00000") as w:
        done = 0
        while done < tokens:
            n = int(rng.integers(200, 2000))
            w.add_document(rng.integers(2, vocab, n).astype(dtype))
            done += n
    return root / "train"


# a parent that starts the trainer and reports its children's peak resident size; it imports nothing, so the
# size its children inherit at the fork is small (a child's ru_maxrss counts from its parent's size at the fork)
_RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
                "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")


def run_training(config: str, overrides: list[str], nproc: int, ranks_per_node: int, steps: int, warmup: int,
                 run_dir: Path) -> dict:
    """`sourcelm train` as a user runs it, in a fresh process tree: the step times after `warmup` steps (the
    first ones pay kernel JIT and page faults), the fastest of them (`step_time`: on a machine shared with
    other jobs the least disturbed step is the one that measures this job) and their median, the peak
    resident size of the largest process (the trainer, or its largest rank) and the metrics records."""
    cmd = [sys.executable, "-m", "sourcelm", "train", config, *overrides, "--run-dir", str(run_dir), "--no-resume",
           "--stop-after", str(steps)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--ranks-per-node", str(ranks_per_node)]
    out = subprocess.run([sys.executable, "-c", _RSS_WRAPPER, *cmd], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    rss = int(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("MAXRSS_KB"))) * 1024
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "step_time" in r][warmup:]
    times = [r["step_time"] for r in timed]
    return {"command": " ".join(["sourcelm", *cmd[3:]]), "step_times": times, "step_time": min(times),
            "median_step_time": statistics.median(times), "peak_rss": rss, "records": timed}


def calibration_run(small: ModelConfig, nproc: int, ranks_per_node: int, ep: int, micro_batch: int, seq_len: int,
                    dtype: str, steps: int = 16, warmup: int = 4, pp: int = 1, schedule: str = "1f1b",
                    global_batch: int | None = None) -> dict:
    """The trainer on `small` (a cut of the model) in the layout to predict: the same processes, pretend nodes, EP,
    micro-batch and dtype; one micro-batch per rank and step, or a pipeline of `pp` ranks under `schedule`
    taking `global_batch` sequences a step."""
    from sourcelm.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        data = write_token_shard(Path(tmp), small.vocab_size)
        cfg = load_config({
            "model": dataclasses.asdict(small), "data": {"train": [str(data)], "seq_len": seq_len},
            "schedule": {"steps": steps + 100, "global_batch": global_batch or micro_batch * nproc,
                         "micro_batch": micro_batch},
            "parallel": {"ep": ep, "pp": pp, "pp_schedule": schedule},
            "train": {"dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype], "device": "cpu"},
            "logging": {"tensorboard": False, "progress": False, "valid_every": 0},
            "checkpoint": {"every": 10**9}})
        path = Path(tmp) / "reduced.json"
        path.write_text(cfg.to_json())
        return run_training(str(path), [], nproc, ranks_per_node, steps, warmup, Path(tmp) / "run")


def _loopback_worker(rank: int, world: int, sizes: list[int], repeats: int) -> dict:
    import torch.distributed as dist

    pairs = [dist.new_group([a, a + 1]) for a in range(0, world - world % 2, 2)]
    group = pairs[rank // 2] if rank < world - world % 2 else None
    out = {}
    for size in sizes:
        send = torch.zeros(2 * size, dtype=torch.uint8)
        recv = torch.empty_like(send)
        dist.barrier()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            if group is not None:
                dist.all_to_all_single(recv, send, group=group)
            times.append(time.perf_counter() - t0)
            dist.barrier()
        out[size] = min(times)  # the least disturbed exchange: the machine may be shared
    return out


def loopback(world: int, small: int = 64, large: int = 4 << 20, repeats: int = 20) -> tuple[float, float]:
    """(latency in s per all-to-all call, bandwidth in bytes/s per rank) of gloo between `world` local
    processes, every pair exchanging at once."""
    from sourcelm.parallel.local_ranks import run_ranks

    if world < 2:
        return 0.0, float("inf")
    res = run_ranks(_loopback_worker, world, [small, large], repeats)
    lat = max(r[small] for r in res)
    t_large = max(r[large] for r in res)
    return lat, large / max(t_large - lat, 1e-9)


def runtime_rss() -> float:
    """Bytes resident in a fresh process that has imported torch and the trainer (no model yet). Read
    from VmHWM: a child's ru_maxrss starts from its parent's size at the fork."""
    code = ("import torch, sourcelm.train.loop; "
            "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) * 1024


def total_memory() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def measure_cpu_box(ranks: int, ranks_per_node: int, model: ModelConfig, ep: int, micro_batch: int, seq_len: int,
                    dtype: str, pp: int = 1, schedule: str = "1f1b",
                    global_batch: int | None = None) -> tuple[Cluster, float, float]:
    """(this machine as a cluster of `ranks` processes in pretend nodes of `ranks_per_node`, the compute rate
    per rank in FLOP/s, the output head's rate per rank). The links, memory copy and matmul are measured directly;
    the rates and the memory a process holds outside the plan's tensors are calibrated on the reduced model trained
    in the same layout, once with the model's vocabulary and once with 256 tokens: the difference of the two steps
    (less the plan's own communication, reduction and update times) prices the head, the rest of the step the
    other FLOPs, and the peak resident size less the plan's own tensors is the process's overhead. The full model
    is then predicted from its own FLOPs, tensors and traffic. The head has its own rate because it is one large
    GEMM and a fused loss, 2-4x faster per FLOP here than the MoE layers' small GEMMs: with one rate for both, the
    last pipeline stage (head and MTP) was predicted 2.7x as busy as the first where it measured 1.2x.
    A pipeline layout (pp > 1) takes the process overhead from one more run: a cut with a layer per stage chunk,
    trained under the schedule, because a pipeline rank holds more outside its tensors than a rank without one
    (DualPipeV's second thread, with its own process groups and its own malloc heap: ~250 MB a rank here)."""
    from sourcelm.plan.estimate import Assumptions, plan_layout
    from sourcelm.plan.layout import PlanLayout

    threads, share = threads_per_rank(ranks), core_share(ranks)
    latency, bw = loopback(ranks)
    links = Cluster(
        name="this CPU box (measured)", nodes=ranks // ranks_per_node, gpus_per_node=ranks_per_node,
        hbm_bytes=total_memory() / ranks, peak_flops={dtype: matmul_peak(dtype, threads) * share}, nvlink_bw=bw,
        ib_bw=bw, link_latency=latency, runtime_bytes=0.0, mem_bw=memcpy_bandwidth() * share,
        comm_overlaps_compute=False, shared_cores=cores() if ranks > 1 else None,
        sources={"all": f"measured on this machine ({cores()} cores, {ranks} process(es), {threads} thread(s) each): "
                        f"gloo loopback, memory copy, matmul; compute rate, head rate and process overhead from a "
                        f"reduced model ({reduced_model(model).num_hidden_layers} layers, no MTP) trained in the "
                        f"same layout, with the model's vocabulary and with 256 tokens"})
    lay = PlanLayout(ep=ep, micro_batch=micro_batch, global_batch=micro_batch * ranks, seq_len=seq_len, dtype=dtype,
                     attention="materialised")

    def calibrated(cfg: ModelConfig):
        """The reduced model trained in the layout: (its run, its plan, its step less communication, reduction and
        update, its head FLOPs, its FLOPs outside the head; FLOPs as the plan's seconds at rate 1)."""
        run = calibration_run(reduced_model(cfg), ranks, ranks_per_node, ep, micro_batch, seq_len, dtype)
        every = plan_layout(reduced_model(cfg), links, lay, Assumptions(compute_rate=1.0))
        rest = plan_layout(reduced_model(cfg), links, lay, Assumptions(compute_rate=1.0, head_rate=float("inf")))
        flops, rest_flops = every.time["compute (micro-batches in turn)"], rest.time["compute (micro-batches in turn)"]
        return run, every, run["step_time"] - (every.step_time - flops), flops - rest_flops, rest_flops

    # the head's rate from the same cut trained with a 256-token vocabulary: the difference of the two steps is the
    # difference of their heads, run as inside a step (the cores shared as in training, the loss's kernels)
    run, small, compute_s, head_flops, flops = calibrated(model)
    _, _, compute_small_vocab_s, head_flops_small_vocab, _ = calibrated(dataclasses.replace(model, vocab_size=256))
    head_s = compute_s - compute_small_vocab_s
    if head_s <= 0:  # noise larger than the head: price it as the rest
        head = flops / max(compute_s, run["step_time"] / 4)
    else:
        head = (head_flops - head_flops_small_vocab) / head_s
    rate = flops / max(compute_s - head_flops / head, run["step_time"] / 4)
    if pp == 1:
        overhead = max(run["peak_rss"] - small.worst_memory.total, runtime_rss())
    else:
        chunks = pp * (2 if schedule == "dualpipev" else 1)
        cut = dataclasses.replace(reduced_model(model), num_hidden_layers=max(chunks, model.first_k_dense_replace + 1))
        piped = dataclasses.replace(lay, pp=pp, schedule=schedule, global_batch=global_batch or lay.global_batch)
        piped_run = calibration_run(cut, ranks, ranks_per_node, ep, micro_batch, seq_len, dtype, pp=pp,
                                    schedule=schedule, global_batch=piped.global_batch)
        planned = plan_layout(cut, links, piped, Assumptions(compute_rate=1.0))
        overhead = max(piped_run["peak_rss"] - planned.worst_memory.total, runtime_rss())
    return dataclasses.replace(links, runtime_bytes=overhead), rate, head
