"""Per-step metrics: `metrics.jsonl`, TensorBoard events, and the peak FLOP/s behind MFU.

MFU = achieved model FLOP/s ÷ peak FLOP/s of the device. Model FLOPs per token come from
`sourcelm.model.flops` (6·N_active for the matmuls plus the attention term; the formula is in that
module). The peak is a table entry for known GPUs (dense bf16 tensor-core figures from the vendors'
data sheets) and, on CPUs, a figure measured once by a matmul probe and recorded in the run's
metrics, so the MFU of a CPU run is relative to what this machine's BLAS actually reaches.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# dense (no sparsity) BF16 tensor-core peaks, FLOP/s
GPU_PEAK_BF16 = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "H20": 148e12,
    "A100": 312e12, "A800": 312e12, "L40S": 362e12, "B200": 2250e12, "GB200": 2500e12,
}


def source_loss_sums(h: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor,
                     n_sources: int, chunk_fn=None) -> torch.Tensor:
    """float64 [n_sources, 2]: per source, the summed cross-entropy of the main head over the target tokens of
    that source, and their count. h [B, T, H] final-normed hidden states; labels [B, T]; sources [B, T] the source
    index of each target token (the document the target belongs to). Each source's rows go through the same
    fused head + loss as training (`linear_cross_entropy`), so the sums over sources are the overall loss's."""
    from sourcelm.model.loss import linear_cross_entropy

    h2, y, src = h.reshape(-1, h.shape[-1]), labels.reshape(-1), sources.reshape(-1)
    out = torch.zeros(n_sources, 2, dtype=torch.float64, device=h.device)
    for s in torch.unique(src).tolist():
        rows = src == s
        out[s, 0] = linear_cross_entropy(h2[rows], head_weight, y[rows], chunk_fn=chunk_fn).double()
        out[s, 1] = int(rows.sum())
    return out


def measure_cpu_peak(dtype: torch.dtype = torch.float32, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of the fastest square matmul this CPU runs for a model computing in `dtype`, with torch's current
    thread count: in the linear layers' layout (x·Wᵀ), in `dtype` and, below fp32, in fp32 too. A CPU without
    native bf16 GEMMs (here an AMD EPYC without AVX-512) ran torch's bf16 x·Wᵀ at 9.4 GFLOP/s against fp32's 76, and
    the FP8 emulation computes its GEMMs in fp32; torch's bf16 x·W ran at 0.9. The probe of a bf16 x·W alone
    put the MFU of bf16 and FP8-emulated runs at 250-340 %."""
    dtypes = (dtype,) if dtype == torch.float32 else (dtype, torch.float32)
    gen = torch.Generator().manual_seed(0)  # a private generator: probing must not move the global RNG
    x, w = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    best = 0.0
    for d in dtypes:
        a, b = x.to(d), w.to(d)
        torch.mm(a, b.t())  # warm-up (thread pool, BLAS kernels)
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / len(dtypes):
            torch.mm(a, b.t())
            n += 1
        best = max(best, 2 * size**3 * n / elapsed)
    return best


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"datasheet bf16 dense peak for {key}"
        return float("nan"), f"unknown GPU {name!r}: no peak in the table"
    probe = "fp32 x·Wᵀ matmul probe" if dtype == torch.float32 else (
        f"the faster of {str(dtype).removeprefix('torch.')} and fp32 x·Wᵀ matmul probes")
    return measure_cpu_peak(dtype), f"measured: {probe}, {torch.get_num_threads()} threads"


class MetricsLogger:
    """Appends one JSON object per call to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a declared dependency; keep going without it
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.writer is not None and "step" in record:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{kind}/{key}", value, record["step"])
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for i, v in enumerate(value):
                        self.writer.add_scalar(f"{kind}/{key}/{i}", v, record["step"])
                elif isinstance(value, dict):  # e.g. the validation loss per source: one curve per name
                    for name, v in value.items():
                        if isinstance(v, (int, float)):
                            self.writer.add_scalar(f"{kind}/{key}/{name}", v, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: the rest is still good
            continue
    return records
