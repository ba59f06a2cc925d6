"""This machine as a cluster: measured, because the CPU trainer runs on what these numbers describe.

  peak          a square matmul's FLOP/s in the compute dtype (`sourcelm.train.metrics.measure_cpu_peak`)
  compute rate  the trainer's step on the model cut down to its dense layers and one MoE layer (no MTP),
                at the run's micro-batch, in FLOP/s: the whole model's time is then its FLOPs / this rate
  memory copy   bytes/s of copying a large tensor (the optimizer's update is memory-bound)
  links         gloo all-to-all between local processes, pairs of ranks at once as the dispatcher's hops
                run: latency (tiny messages) and bandwidth (4 MB per peer). Every "link" is the loopback.
  runtime       the resident size of a process that has imported torch and the trainer, before any tensor
Ranks share the cores: with more processes than cores each gets cores / processes of one thread's rate.
"""

from __future__ import annotations

import dataclasses
import os
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


def compute_rate(cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: str, threads: int, steps: int = 4) -> float:
    """Model FLOP/s of the trainer's own step (`Trainer.train_step`: forward, backward, update) on
    `reduced_model(cfg)` at one micro-batch of `micro_batch` x `seq_len`, the fastest of `steps` after two
    warm-up steps; the update's modelled time (the estimate adds it on its own) is taken out."""
    from sourcelm.config import load_config
    from sourcelm.model.flops import model_stats
    from sourcelm.train.loop import Trainer

    small = reduced_model(cfg)
    with tempfile.TemporaryDirectory() as tmp, _Threads(threads):
        data = write_token_shard(Path(tmp), small.vocab_size)
        run = load_config({
            "model": dataclasses.asdict(small), "data": {"train": [str(data)], "seq_len": seq_len},
            "schedule": {"steps": steps + 2, "global_batch": micro_batch, "micro_batch": micro_batch},
            "train": {"dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype], "device": "cpu"},
            "logging": {"tensorboard": False, "progress": False, "valid_every": 0}, "checkpoint": {"every": 10**9}})
        trainer = Trainer(run, Path(tmp) / "run", progress=False)
        best = float("inf")
        for i in range(steps + 2):
            t0 = time.perf_counter()
            trainer.train_step()
            if i >= 2:  # the first steps pay one-time costs (kernel JIT, page faults)
                best = min(best, time.perf_counter() - t0)
        n_params = sum(p.numel() for p in trainer.model.parameters())
    update = n_params * 30 / memcpy_bandwidth()  # as estimate.py models the AdamW update
    flops = model_stats(small, seq_len)["train_flops_per_token"] * micro_batch * seq_len
    return flops / max(best - update, best / 2)


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
        out[size] = sorted(times)[len(times) // 2]
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


def measure_cpu_box(ranks: int, ranks_per_node: int, model: ModelConfig, micro_batch: int, seq_len: int,
                    dtype: str) -> tuple[Cluster, float]:
    """(this machine as a cluster of `ranks` processes in pretend nodes of `ranks_per_node`, the measured
    compute rate per rank in FLOP/s for the model at this micro-batch)."""
    threads, share = threads_per_rank(ranks), core_share(ranks)
    peak = {dtype: matmul_peak(dtype, threads) * share}
    latency, bw = loopback(ranks)
    rate = compute_rate(model, micro_batch, seq_len, dtype, threads) * share
    cluster = Cluster(
        name="this CPU box (measured)", nodes=ranks // ranks_per_node, gpus_per_node=ranks_per_node,
        hbm_bytes=total_memory() / ranks, peak_flops=peak, nvlink_bw=bw, ib_bw=bw, link_latency=latency,
        runtime_bytes=runtime_rss(), mem_bw=memcpy_bandwidth() * share,
        sources={"all": f"measured on this machine ({cores()} cores, {ranks} process(es), {threads} thread(s) each): "
                        f"matmul, reduced-model step, memory copy, gloo loopback, process RSS"})
    return cluster, rate
