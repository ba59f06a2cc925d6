"""Training with `train.fp8 = "emulate"`: the linear layers' GEMMs in DeepSeek-V3's FP8 recipe through the model's
one linear dispatch point. It trains (finite, falling loss), differs from the BF16 run only by FP8's rounding,
resumes bit for bit, and EP 4 on 4 processes equals the same layout hosted by one process bit for bit (EP 1 in one
process: within 1e-3, the sums' order moving FP8 roundings, about as far as BF16 autocast's drift)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sourcelm.config import ConfigError
from sourcelm.kernels import ops
from sourcelm.train.loop import Trainer


def _losses(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_fp8_reaches_every_projection_and_the_experts(small_config, tmp_path, monkeypatch):
    """One step: every GEMM of the linear layers, the routed experts' included, goes through the FP8 linear, the
    FFNs' down projections through the FP8 SwiGLU + linear (which keeps the SwiGLU's input for backward), o_proj
    through the FP8 attention output (which keeps the core's output in E5M6); the head and the gate do not (the
    report keeps them in BF16/FP32)."""
    from sourcelm.kernels import fp8, fp8_attention

    calls, down, attention = [], [], []
    linear, swiglu_linear, attention_output = fp8.fp8_linear, fp8.fp8_swiglu_linear, fp8_attention.fp8_attention_output
    monkeypatch.setattr(fp8, "fp8_linear", lambda x, w, *a: calls.append(tuple(w.shape)) or linear(x, w, *a))
    monkeypatch.setattr(fp8, "fp8_swiglu_linear",
                        lambda gu, w, *a: down.append(tuple(w.shape)) or swiglu_linear(gu, w, *a))
    monkeypatch.setattr(fp8_attention, "fp8_attention_output",
                        lambda q, k, v, s, w, *a: attention.append(tuple(w.shape))
                        or attention_output(q, k, v, s, w, *a))
    t = Trainer(small_config("train.fp8=emulate", "train.dtype=float32"), tmp_path, progress=False)
    t.train_step()
    cfg = t.cfg.model
    shapes = set(calls)
    # o_proj, with the attention core, keeping the core's output in E5M6: once per attention layer (MTP's included)
    micro_batches = t.cfg.schedule.global_batch // t.cfg.schedule.micro_batch
    attention_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert attention == [(cfg.hidden_size, cfg.num_attention_heads * cfg.v_head_dim)] * attention_layers * micro_batches
    assert (2 * cfg.moe_intermediate_size, cfg.hidden_size) in shapes  # an expert's stacked gate and up
    assert (2 * cfg.intermediate_size, cfg.hidden_size) in shapes  # the dense layer's stacked gate and up
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    shared = (cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
    # every expert (the loop skips an expert with no rows), the shared experts and the dense layers' FFNs
    assert down.count((cfg.hidden_size, cfg.moe_intermediate_size)) >= moe_layers * (cfg.n_routed_experts // 2)
    assert down.count(shared) >= moe_layers and (cfg.hidden_size, cfg.intermediate_size) in down
    assert (cfg.vocab_size, cfg.hidden_size) not in shapes | set(down)  # the head stays out
    assert (cfg.n_routed_experts, cfg.hidden_size) not in shapes  # the gate stays out
    assert ops._linear_precision == "off"  # only inside the trainer's compute


def test_fp8_training_stays_finite_and_close_to_bf16(small_config, tmp_path):
    """100 steps of the small model: every step finite in FP8 (none skipped), the loss falls, and ends within a
    few percent of the same run without FP8 (FP8's 4-bit mantissa is the only difference)."""
    common = ("schedule.steps=100", "checkpoint.every=1000", "logging.valid_every=0", "train.dtype=bfloat16")
    runs = {}
    for fp8 in ("off", "emulate"):
        t = Trainer(small_config(*common, f"train.fp8={fp8}"), tmp_path / fp8, progress=False)
        t.fit()
        runs[fp8] = _losses(tmp_path / fp8)
        assert t.state.skipped_steps == 0
    fp8_losses = [r["loss"] for r in runs["emulate"]]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in runs["emulate"])
    assert fp8_losses[-1] < 0.7 * fp8_losses[0]
    assert fp8_losses[-1] == pytest.approx(runs["off"][-1]["loss"], rel=0.05)
    assert fp8_losses[-1] != runs["off"][-1]["loss"]  # FP8 really ran


def test_fp8_resume_is_bit_identical(small_config, digest, tmp_path):
    cfg = small_config("train.fp8=emulate")
    ref = Trainer(cfg, tmp_path / "straight", progress=False)
    ref.fit()
    first = Trainer(cfg, tmp_path / "split", progress=False)
    first.fit(stop_after=4)
    second = Trainer(cfg, tmp_path / "split", progress=False)
    assert second.resume()
    second.fit()
    assert digest(second.model) == digest(ref.model)


@pytest.mark.slow
def test_fp8_expert_parallel_matches_one_process(small_args, tmp_path):
    """EP 4 over 2 pretend nodes against one process with FP8. The first two steps agree to 1e-5, as in fp32; after
    that they drift apart by up to a few 1e-4, as BF16 autocast's runs do: the layouts sum in another order (last
    bits), and a rounding that a last bit moves across a boundary of the format's grid changes a value by up to its
    rounding unit (FP8 2^-4, BF16 2^-8), which later steps carry on and which can flip a routing decision. Measured
    over 10 steps (max relative loss difference, EP 4 against one process): fp32 6e-8, BF16 autocast 1.4e-4, FP8
    1.6e-4 (2.7e-4 before the FP8 dispatch's power-of-2 rounding, 4e-4 before the SwiGLU's FP8 input cache). So 1e-5
    holds only in fp32; FP8 drifts about as far as BF16 (1.1x), asserted here as within 4x. What differs is the order
    of the sums, not the processes: the same EP 4 layout hosted by one process (4 virtual ranks, the reductions of 4
    processes) is bit-identical to the 4-process run, FP8 and all."""
    def train(run_dir, precision, *launch, module=("sourcelm", "train")):
        cmd = [sys.executable, "-m", *module, *small_args, "schedule.steps=10", "checkpoint.every=100",
               "schedule.micro_batch=1", *precision, *launch, "--run-dir", str(run_dir)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return _losses(run_dir)

    def drift(a, b):
        assert len(a) == len(b) == 10
        return [abs(x["loss"] / y["loss"] - 1) for x, y in zip(a, b)]

    fp8, bf16 = ("train.dtype=float32", "train.fp8=emulate"), ("train.dtype=bfloat16", "train.fp8=off")
    ep4 = ("parallel.ep=4", "--nproc", "4", "--ranks-per-node", "2")
    single = train(tmp_path / "single", fp8, "parallel.ep=1")
    ep = train(tmp_path / "ep4", fp8, *ep4)
    hosted = train(tmp_path / "hosted", fp8, "parallel.ep=4", "--virtual-ranks", "4", "--ranks-per-node", "2",
                   module=("sourcelm.train",))
    assert [r["loss"] for r in hosted] == [r["loss"] for r in ep]
    assert [r["grad_norm"] for r in hosted] == [r["grad_norm"] for r in ep]
    fp8_drift = drift(single, ep)
    bf16_drift = drift(train(tmp_path / "single_bf16", bf16, "parallel.ep=1"), train(tmp_path / "ep4_bf16", bf16, *ep4))
    assert max(fp8_drift[:2]) < 1e-5
    assert max(fp8_drift) < 1e-3
    assert max(fp8_drift) < 4 * max(bf16_drift), (fp8_drift, bf16_drift)  # measured 1.6e-4 against 1.4e-4


def test_fp8_cuda_without_a_gpu_fails_at_start_naming_the_setting(small_config, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"train\.fp8 = 'cuda'.*'emulate'"):
        Trainer(small_config("train.fp8=cuda", "train.device=cpu"), tmp_path, progress=False)


def test_fp8_setting_is_validated_with_the_config(small_config):
    with pytest.raises(ConfigError, match=r"train\.fp8"):
        small_config("train.fp8=e4m3")
