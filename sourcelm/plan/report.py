"""The DeepSeek-V3 report as the plan's reference case: its layout on 2048 H800 and the kernel rate of its
published training profile (reference §2.1, §3.1, §3.5).

  layout      PP 16 (DualPipe) x EP 64 over 8 nodes x ZeRO-1 DP 128, one 4096-token sequence per micro-batch,
              15360 sequences per step, FP8, RMSNorm / MLA up-projections and SwiGLU outputs recomputed
  profile     one overlapped pair of a forward and a backward MoE layer on 4096 tokens per rank (EP 64, FP8
              GEMMs): 129.0 ms for 4 pairs, 32.25 ms a pair; its model FLOPs / time / the FP8 peak is the one
              assumption about kernels the reproduction makes (about 26 % of FP8, 52 % of BF16)
  cost        2,664K H800 GPU-hours for 14.8T tokens: 180K per trillion
"""

from __future__ import annotations

from sourcelm.config import ModelConfig, load_config
from sourcelm.plan.cluster import Cluster, load_cluster
from sourcelm.plan.estimate import Assumptions, Plan, plan_layout
from sourcelm.plan.layout import PlanLayout
from sourcelm.plan.model_costs import model_slots

LAYOUT = PlanLayout(pp=16, ep=64, schedule="dualpipe", micro_batch=1, global_batch=15360, seq_len=4096, dtype="fp8",
                    recompute=("norm_up_proj", "swiglu"))
PROFILE_SPAN_S, PROFILE_PAIRS, PROFILE_TOKENS = 0.129, 4, 4096
GPU_HOURS_PER_TRILLION = 180e3
GPU_HOURS_14T8 = 2664e3


def profile_efficiency(model: ModelConfig, cluster: Cluster) -> float:
    """The profile's model FLOP/s as a fraction of the cluster's FP8 peak."""
    moe = next(s for s in model_slots(model, PROFILE_TOKENS) if s.kind == "moe")
    return PROFILE_TOKENS * moe.train_flops / (PROFILE_SPAN_S / PROFILE_PAIRS) / cluster.peak("fp8")


def mfu_for(gpu_hours_per_trillion: float, flops_per_token: float, peak: float) -> float:
    """The MFU at which a model of `flops_per_token` trains a trillion tokens in that many GPU-hours."""
    return flops_per_token * 1e12 / (gpu_hours_per_trillion * 3600 * peak)


def report_plan() -> Plan:
    model = load_config("deepseek-v3-671b").model
    h800 = load_cluster("h800")
    return plan_layout(model, h800, LAYOUT, Assumptions(efficiency=profile_efficiency(model, h800), recipe="deepseek"))
