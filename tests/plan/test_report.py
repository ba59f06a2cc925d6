"""The report's system figures from `sourcelm plan`: DeepSeek-V3 (671B / 37B) on 2048 H800 as PP 16
DualPipe x EP 64 over 8 nodes x ZeRO-1 DP, FP8, recomputing RMSNorm / MLA up-projections and the SwiGLU
outputs (report §3.1-§3.3, reference §2.1 and §3.1), at the kernel rate of DeepSeek's published training
profile (`sourcelm.plan.report`): everything else comes from the model, the layout and the cluster file.
"""

from __future__ import annotations

import dataclasses

import pytest

from sourcelm.config import load_config
from sourcelm.model.flops import model_stats
from sourcelm.plan import report
from sourcelm.plan.cluster import load_cluster
from sourcelm.plan.estimate import plan_layout
from sourcelm.plan.model_costs import model_slots

H800_BF16_PEAK = 989e12


@pytest.fixture(scope="module")
def model():
    return load_config("deepseek-v3-671b").model


@pytest.fixture(scope="module")
def plan():
    return report.report_plan()


def test_parameters_671b_total_37b_activated(model):
    stats = model_stats(model, 4096)
    assert round(stats["total_params"] / 1e9) == 671
    assert round(stats["active_params"] / 1e9) == 37
    slots = model_slots(model, 4096)  # the plan's slots add up to the same model
    assert sum(s.params for s in slots if s.kind != "mtp") == stats["total_params"]
    assert sum(s.params for s in slots if s.kind == "mtp") == stats["mtp_params"]
    assert sum(s.train_flops for s in slots if s.kind != "mtp") == pytest.approx(stats["flops_per_token"], abs=1)
    assert sum(s.train_flops for s in slots if s.kind == "mtp") == pytest.approx(stats["mtp_flops_per_token"], abs=1)


def test_the_report_layout(plan):
    res = plan.res
    assert (res.world, res.dp, res.n_micro, res.chunks, res.chunks_per_rank) == (2048, 128, 120, 16, 2)
    assert (res.ep_nodes, res.expert_replicas) == (8, 2)  # EP64 spans 8 nodes; each expert on 2 ranks per stage
    assert plan.pipeline.peak_activations[0] == 17  # Table 2: PP + 1 chunks in flight under DualPipe
    assert all(len(held) == 2 for held in plan.pipeline.chunks_held)  # Table 2: 2x parameters


def test_profile_efficiency_is_about_half_the_bf16_peak(model):
    """The profile's pair: 4096 tokens x 4.0 GFLOP (an MoE layer's F + B + W per token) in 32.25 ms."""
    eff = report.profile_efficiency(model, load_cluster("h800"))
    assert 0.25 < eff < 0.27  # of the FP8 peak
    assert 0.50 < eff * 1979 / 989 < 0.53  # of the BF16 peak


def test_gpu_hours_per_trillion_tokens_within_25_percent_of_180k(plan):
    """At the profile's efficiency the plan predicts the report's cost; the MFU that gives 180K exactly is
    printed next to the plan's and to the ≈ 39 % of the BF16 peak the reference derives at ≈ 250 GFLOP."""
    flops = plan.flops_per_token
    mfu_for_180k = report.mfu_for(report.GPU_HOURS_PER_TRILLION, flops, H800_BF16_PEAK)
    print(f"\nDeepSeek-V3 on 2048 H800, {report.LAYOUT.describe()}: step {plan.step_time:.2f} s, "
          f"{plan.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, {plan.gpu_hours_per_trillion:,.0f} GPU-hours per 1T tokens "
          f"(report 180,000); MFU {plan.mfu:.1%}; the MFU that reproduces 180K exactly: {mfu_for_180k:.1%} "
          f"at {flops / 1e9:.1f} GFLOP/token (reference: about 39 % at about 250)")
    assert abs(flops / 250e9 - 1) < 0.01
    assert abs(mfu_for_180k - 0.39) < 0.005
    assert abs(plan.gpu_hours_per_trillion / report.GPU_HOURS_PER_TRILLION - 1) < 0.25
    assert abs(plan.mfu / mfu_for_180k - 1) < 0.25
    assert abs(plan.days_for(14.8e12) * 24 * 2048 / report.GPU_HOURS_14T8 - 1) < 0.25


def test_the_report_layout_fits_an_h800_with_its_recomputation(model, plan):
    """80 GB holds the layout with the report's memory savings; without recomputing the norms and MLA's
    up-projections (their outputs are the largest activations) it does not, and activations are then the
    largest term."""
    assert plan.fits, {m.rank: m.total / 1e9 for m in plan.memory}
    without = plan_layout(model, plan.cluster, dataclasses.replace(report.LAYOUT, recompute=()), plan.assumptions)
    assert not without.fits
    assert without.worst_memory.largest[0].startswith("activations")
