"""Layouts that cannot exist are refused naming the field; layouts that exist but do not fit are reported
with their largest term and the one-field changes that make them fit; the search ranks what fits."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sourcelm.cli import main
from sourcelm.config import ConfigError, load_config
from sourcelm.plan.cluster import load_cluster
from sourcelm.plan.estimate import Assumptions, core_speed, plan_layout
from sourcelm.plan.layout import PlanLayout, resolve
from sourcelm.plan.model_costs import effective_recompute
from sourcelm.plan.search import fixes, search


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny").model


@pytest.fixture(scope="module")
def v3():
    return load_config("deepseek-v3-671b").model


ONE_NODE = load_cluster("h100").with_nodes(1)  # 8 GPUs


@pytest.mark.parametrize("change, message", [
    ({"pp": 3}, r"parallel.pp = 3 must divide the 8 ranks \(1 nodes x 8\); choose among \[1, 2, 4, 8\]"),
    ({"pp": 8}, r"parallel.pp = 8 cuts the model into 8 chunks but it has 4 decoder layers; choose parallel.pp among "
                r"\[1, 2, 4\]"),
    ({"pp": 4, "schedule": "dualpipev"}, r"parallel.pp = 4 cuts the model into 8 chunks \(dualpipev: 2 per rank\)"),
    ({"ep": 3}, r"parallel.ep = 3 must divide model.n_routed_experts = 16; choose among \[1, 2, 4, 8, 16\]"),
    ({"ep": 16}, r"parallel.ep = 16 must divide the 8 ranks of a pipeline stage"),
    ({"pp": 2, "ep": 8}, r"parallel.ep = 8 must divide the 4 ranks of a pipeline stage"),
    ({"global_batch": 12}, r"schedule.global_batch = 12 must be a multiple of schedule.micro_batch x DP = 1 x 8"),
    ({"pp": 2, "schedule": "dualpipe", "global_batch": 8}, r"'dualpipe' needs .* at least 2 x pp = 4 \(got 2\)"),
    ({"pp": 2, "pp_layers": (3, 2)}, r"parallel.pp_layers = \[3, 2\]: give 2 layer counts, each >= 1, summing to "
                                     r"model.num_hidden_layers = 4"),
    ({"dtype": "fp16"}, r"train.dtype = 'fp16'"),
    ({"recompute": ("attention",)}, r"plan.recompute = 'attention'"),
])
def test_impossible_layouts_are_refused_naming_the_field(tiny, change, message):
    lay = dataclasses.replace(PlanLayout(micro_batch=1, global_batch=8, seq_len=256), **change)
    with pytest.raises(ConfigError, match=message):
        resolve(lay, tiny, ONE_NODE)


def test_the_plan_cuts_chunks_where_the_layer_counts_say(tiny):
    def layers_per_chunk(**change):
        lay = dataclasses.replace(PlanLayout(pp=2, micro_batch=1, global_batch=32, seq_len=256), **change)
        return [sum(s.kind in ("dense", "moe") for s in c) for c in plan_layout(tiny, ONE_NODE, lay).chunks]

    assert layers_per_chunk(pp_layers=(3, 1)) == [3, 1]
    assert layers_per_chunk(pp_layers=(1, 3)) == [1, 3]
    assert layers_per_chunk(schedule="dualpipev", pp_layers=(1, 1, 1, 1)) == [1, 1, 1, 1]


def test_the_head_is_priced_at_its_own_rate(tiny):
    """Assumptions.head_rate prices the head's GEMM (main and MTP passes: 2 x hidden x vocab FLOPs per token in each
    of F, Bi and W) apart from the rest; left unset it is the rate of the rest."""
    lay = PlanLayout(pp=2, micro_batch=1, global_batch=32, seq_len=256)
    one = plan_layout(tiny, ONE_NODE, lay, Assumptions(compute_rate=1e9))
    same = plan_layout(tiny, ONE_NODE, lay, Assumptions(compute_rate=1e9, head_rate=1e9))
    free = plan_layout(tiny, ONE_NODE, lay, Assumptions(compute_rate=1e9, head_rate=float("inf")))
    assert one.costs == same.costs
    head = 2 * tiny.hidden_size * tiny.vocab_size * 256 / 1e9  # seconds of one head pass of a micro-batch, at 1e9
    passes = 1 + tiny.num_nextn_predict_layers  # both on the last chunk
    for kind in ("f_comp", "bi_comp", "w_comp"):
        assert getattr(one.costs[0], kind) == getattr(free.costs[0], kind)  # no head on the first chunk
        assert getattr(one.costs[1], kind) - getattr(free.costs[1], kind) == pytest.approx(passes * head)


def test_ranks_that_share_cores_compute_faster_while_others_wait(tiny):
    """On the CPU box (`shared_cores`) a stage computes faster while the other waits, up to a core per process; its
    busy time and bubble shrink, the work is the same. GPUs (no shared cores) keep the schedule's own timing."""
    lay = PlanLayout(pp=2, ep=2, micro_batch=1, global_batch=8, seq_len=256)
    box = dataclasses.replace(ONE_NODE, gpus_per_node=4, comm_overlaps_compute=False)
    assert core_speed(box, 4, 2) is None
    two_cores = dataclasses.replace(box, shared_cores=2)
    speed = core_speed(two_cores, 4, 2)
    assert (speed(1), speed(2)) == (2.0, 1.0)  # one stage's 2 processes alone on 2 cores; all 4 sharing them
    assert core_speed(dataclasses.replace(box, shared_cores=4), 4, 2)(1) == 1.0  # one thread each: no faster
    alone, shared = (plan_layout(tiny, c, lay, Assumptions(compute_rate=1e9)) for c in (box, two_cores))
    assert alone.costs == shared.costs
    assert shared.step_time < alone.step_time
    assert all(s < a for s, a in zip(shared.pipeline.idle, alone.pipeline.idle))


def test_deepseek_layouts_that_cannot_exist(v3):
    h800 = load_cluster("h800")
    base = PlanLayout(pp=16, ep=64, schedule="dualpipe", micro_batch=1, global_batch=15360, seq_len=4096)
    resolve(base, v3, h800)  # the report's layout exists
    with pytest.raises(ConfigError, match=r"parallel.pp = 64 cuts the model into 128 chunks .* 61 decoder layers"):
        resolve(dataclasses.replace(base, pp=64, schedule="dualpipev"), v3, h800)
    with pytest.raises(ConfigError, match=r"parallel.ep = 48 must divide model.n_routed_experts = 256"):
        resolve(dataclasses.replace(base, ep=48), v3, h800)
    # EP 64 on one node of 8: the EP group is larger than a pipeline stage
    with pytest.raises(ConfigError, match=r"parallel.ep = 64 must divide the 8 ranks of a pipeline stage"):
        resolve(dataclasses.replace(base, pp=1, global_batch=8), v3, h800.with_nodes(1))


def test_cli_refuses_with_the_field_and_exit_code_2(capsys):
    assert main(["plan", "tiny", "--cluster", "h100", "--nodes", "1", "--pp", "8", "--schedule", "1f1b"]) == 2
    assert "config error: parallel.pp = 8 cuts the model into 8 chunks" in capsys.readouterr().err


def test_a_layout_that_does_not_fit_names_its_largest_term_and_the_fixes():
    """The 1B `small` preset at 32 sequences of 2048 per micro-batch on 80 GB: the activations (63 GB of
    92) do not fit; a smaller micro-batch or recomputation would."""
    small = load_config("small").model
    lay = PlanLayout(micro_batch=32, global_batch=256, seq_len=2048, dtype="bf16")
    plan = plan_layout(small, ONE_NODE, lay)
    assert not plan.fits and plan.worst_memory.total > ONE_NODE.hbm_bytes
    assert plan.worst_memory.largest[0].startswith("activations")
    found = fixes(small, ONE_NODE, lay, Assumptions())
    labels = [label for label, _ in found]
    assert "schedule.micro_batch = 1" in labels and any(label.startswith("plan.recompute = ") for label in labels)
    assert all(p.fits for _, p in found)
    assert [p.step_time for _, p in found] == sorted(p.step_time for _, p in found)


def test_cli_json_reports_not_fitting(capsys):
    code = main(["plan", "small", "--cluster", "h100", "--nodes", "1", "--micro-batch", "32", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    mem = out["memory"]
    assert mem["fits"] is False and mem["largest_term"].startswith("activations")
    assert mem["worst_total_bytes"] > mem["capacity_bytes"]
    assert any(f["change"] == "schedule.micro_batch = 1" and f["worst_total_bytes"] < mem["capacity_bytes"]
               for f in mem["fixes"])


def test_search_ranks_the_layouts_that_fit(tiny):
    base = PlanLayout(micro_batch=1, global_batch=16, seq_len=256)
    result = search(tiny, ONE_NODE, base, Assumptions(), top=1000)
    assert result.impossible > 0  # e.g. PP 8 (more chunks than tiny's 4 layers), EP 16 on 8 GPUs
    times = [p.step_time for p in result.fitting]
    assert times == sorted(times)
    assert all(p.fits for p in result.fitting)
    layouts = {(p.res.layout.pp, p.res.layout.ep, p.res.layout.schedule) for p in result.fitting}
    assert {(1, 8, "1f1b"), (2, 4, "dualpipe"), (4, 2, "zb1p"), (2, 2, "dualpipev")} <= layouts
    assert not any(pp == 8 for pp, _, _ in layouts)


def test_fp8_search_lists_each_run_once(tiny):
    """FP8 training always recomputes the SwiGLU, so under FP8 "norm_up_proj" and "norm_up_proj + swiglu" are the same
    run: the search lists it once (in BF16 they differ, and both appear)."""
    for dtype, per_layout in (("fp8", 3), ("bf16", 4)):
        base = PlanLayout(micro_batch=1, global_batch=16, seq_len=256, dtype=dtype)
        result = search(tiny, ONE_NODE, base, Assumptions(), top=10000)
        keys = [(p.res.layout.pp, p.res.layout.ep, p.res.layout.schedule, p.res.layout.micro_batch,
                 p.res.layout.recompute) for p in result.fitting]
        runs = [(*k[:4], tuple(sorted(effective_recompute(dtype, k[4])))) for k in keys]
        assert len(set(runs)) == len(runs)
        assert max(sum(k[:4] == r[:4] for k in keys) for r in keys) == per_layout
