"""Cluster descriptions: what a GPU (or a CPU rank) can compute, hold and send.

Shipped descriptions (`clusters/*.toml`: H800, H100, H200) carry the datasheet or report figure
behind every number in their `[sources]` table. "cpu" describes this machine: `measure.py` fills it
in by measuring a matmul, a memory copy and the gloo loopback between local processes, because those
are what the CPU trainer runs on. A TOML file of the same shape describes any other cluster.

Units inside the program are SI: bytes, FLOP/s, bytes/s, seconds. Bandwidths are per GPU and one
direction, the way the report states them (NVLink ≈ 160 GB/s, IB ≈ 50 GB/s).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from sourcelm.config import ConfigError

CLUSTER_DIR = Path(__file__).parent / "clusters"


@dataclass
class Cluster:
    name: str
    nodes: int
    gpus_per_node: int  # ranks per node (on the CPU box: the pretend node size)
    hbm_bytes: float  # memory per rank
    peak_flops: dict[str, float]  # dense peak per rank by compute dtype ("bf16", "fp8", "fp32")
    nvlink_bw: float  # bytes/s per rank inside a node
    ib_bw: float  # bytes/s per rank across nodes
    link_latency: float  # seconds per collective step
    runtime_bytes: float  # per rank, outside any tensor (CUDA context / the Python process itself)
    mem_bw: float | None = None  # bytes/s of device memory (HBM; a memory copy on the CPU box): memory-bound work
    # GPUs run the all-to-all on their own SMs (DeepEP) beside the compute; gloo on a CPU takes the same cores
    comm_overlaps_compute: bool = True
    # the CPU box: every rank runs one thread on these shared cores, so a rank that waits gives its share to the
    # busy ones; None: each rank has a device of its own
    shared_cores: int | None = None
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ConfigError(f"train.dtype = {dtype!r}: cluster {self.name} gives a peak only for "
                              f"{', '.join(self.peak_flops)}")
        return self.peak_flops[dtype]

    def with_nodes(self, nodes: int | None) -> Cluster:
        if nodes is None:
            return self
        if nodes <= 0:
            raise ConfigError(f"--nodes = {nodes} must be positive")
        return dataclasses.replace(self, nodes=nodes)

    def describe(self) -> str:
        return (f"{self.name}: {self.nodes} x {self.gpus_per_node} = {self.world} ranks, "
                f"{self.hbm_bytes / 1e9:.0f} GB each, peak {self.peak_flops.get('bf16', 0) / 1e12:.0f} TFLOP/s bf16, "
                f"intra-node {self.nvlink_bw / 1e9:.0f} GB/s, inter-node {self.ib_bw / 1e9:.0f} GB/s"
                + (f", {self.shared_cores} cores shared by all ranks" if self.shared_cores else ""))


def shipped_clusters() -> list[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.toml"))


def cluster_from_toml(data: dict, where: str) -> Cluster:
    required = ("name", "nodes", "gpus_per_node", "hbm_gb", "peak_bf16_tflops", "nvlink_gb_s", "ib_gb_s")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)} (see {CLUSTER_DIR / 'h800.toml'} for the shape)")
    peaks = {"bf16": data["peak_bf16_tflops"] * 1e12}
    if "peak_fp8_tflops" in data:
        peaks["fp8"] = data["peak_fp8_tflops"] * 1e12
    if "peak_fp32_tflops" in data:
        peaks["fp32"] = data["peak_fp32_tflops"] * 1e12
    return Cluster(
        name=data["name"], nodes=int(data["nodes"]), gpus_per_node=int(data["gpus_per_node"]),
        hbm_bytes=data["hbm_gb"] * 1e9, peak_flops=peaks, nvlink_bw=data["nvlink_gb_s"] * 1e9,
        ib_bw=data["ib_gb_s"] * 1e9, link_latency=data.get("link_latency_us", 10) * 1e-6,
        runtime_bytes=data.get("runtime_gb", 0) * 1e9,
        mem_bw=data["hbm_bw_tb_s"] * 1e12 if "hbm_bw_tb_s" in data else None, sources=dict(data.get("sources", {})))


def load_cluster(name_or_path: str) -> Cluster:
    """A shipped cluster by name (h800, h100, h200; any case) or a TOML file. The CPU box is measured:
    see `measure.measure_cpu_box`."""
    path = Path(name_or_path)
    if not path.exists():
        path = CLUSTER_DIR / f"{name_or_path.lower()}.toml"
        if not path.exists():
            raise ConfigError(f"--cluster {name_or_path!r}: not a file and not one of "
                              f"{', '.join(shipped_clusters())} (or 'cpu' for this machine, measured)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return cluster_from_toml(data, str(path))
