"""The trainer on a CUDA GPU, against the CPU trainer and against the FP8 emulation. Skipped without CUDA (CI has
none). NOT YET RUN ON A GPU: no session so far has been lent one, so the tolerances below are the ones the CPU
checks use for the same differences (other kernels, other summation orders), to be confirmed on the first GPU run:

    python3 -m pytest -q -rs tests/kernels/test_fp8.py tests/train/test_cuda_training.py
    python3 bench/fp8_loss.py speed --device cuda          # tokens/s, MFU, peak memory: FP8 against BF16
"""

import json
import math

import pytest
import torch

from sourcelm.train.loop import Trainer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _train(config, run_dir):
    trainer = Trainer(config, run_dir, progress=False)
    trainer.fit()
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return trainer, rows


@needs_cuda
def test_the_trainer_on_cuda_follows_the_cpu_trainer(small_config, tmp_path):
    """FP32, one process, the same seed and data: the first step's loss equals the CPU's to 1e-5 (the same model and
    batch through cuBLAS instead of the CPU kernels, TF32 off); the next steps stay within 1e-3, where a routing
    decision that a last bit moves may differ, as between the CPU's own layouts."""
    common = ("schedule.steps=6", "checkpoint.every=1000", "logging.valid_every=0", "train.dtype=float32")
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        runs = {dev: _train(small_config(*common, f"train.device={dev}"), tmp_path / dev) for dev in ("cpu", "cuda")}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    (_, cpu_rows), (gpu, gpu_rows) = runs["cpu"], runs["cuda"]
    assert next(gpu.model.parameters()).is_cuda
    assert len(cpu_rows) == len(gpu_rows) == 6
    assert gpu_rows[0]["loss"] == pytest.approx(cpu_rows[0]["loss"], rel=1e-5)
    for a, b in zip(cpu_rows, gpu_rows):
        assert math.isfinite(b["loss"]) and math.isfinite(b["grad_norm"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), b["step"]


@needs_cuda
def test_fp8_on_cuda_tracks_the_emulation_on_the_same_gpu(small_config, tmp_path):
    """BF16 with `train.fp8 = "cuda"` (torch's blockwise-scaled FP8 GEMM) against `"emulate"` on the same GPU: the
    same quantization, so the first step's loss agrees to 1e-3 (the tensor cores accumulate a 128-long chunk of K in
    fewer bits than the emulation's FP32); every step is finite, none is skipped, and after 20 steps the losses are
    within 2 %, as FP8 and BF16 are on the CPU over 100 steps."""
    from sourcelm.kernels.fp8 import MIN_FP8_CAPABILITY, blockwise_scaled_mm_problem

    device = torch.device("cuda")
    if torch.cuda.get_device_capability(device) < MIN_FP8_CAPABILITY:
        pytest.skip(f"compute capability {torch.cuda.get_device_capability(device)}: no FP8 tensor cores")
    if problem := blockwise_scaled_mm_problem(device):  # named in the skip, so that the GPU run's log says why
        pytest.skip(problem)
    common = ("schedule.steps=20", "checkpoint.every=1000", "logging.valid_every=0", "train.dtype=bfloat16",
              "train.device=cuda")
    runs = {fp8: _train(small_config(*common, f"train.fp8={fp8}"), tmp_path / fp8) for fp8 in ("emulate", "cuda")}
    (_, emulated), (trainer, cuda) = runs["emulate"], runs["cuda"]
    assert trainer.state.skipped_steps == 0
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in cuda)
    assert cuda[0]["loss"] == pytest.approx(emulated[0]["loss"], rel=1e-3)
    assert cuda[-1]["loss"] == pytest.approx(emulated[-1]["loss"], rel=0.02)
