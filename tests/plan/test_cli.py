"""`sourcelm plan` from the command line: the report's layout as JSON, the search as a table, this machine."""

from __future__ import annotations

import json

import pytest

from sourcelm.cli import main

REPORT_ARGS = ["plan", "deepseek-v3-671b", "--cluster", "h800", "--pp", "16", "--schedule", "dualpipe", "--dtype",
               "fp8", "--recompute", "norm_up_proj,swiglu", "--recipe", "deepseek", "--efficiency", "0.258",
               "--tokens", "14.8e12"]


def test_report_layout_as_json(capsys):
    assert main([*REPORT_ARGS, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    lay = out["layout"]
    assert (lay["pp"], lay["ep"], lay["dp"], lay["micro_batches_per_step"]) == (16, 64, 128, 120)
    assert lay["chunks"][0][0] == "embed" and lay["chunks"][-1][-2:] == ["mtp.0", "head"]
    assert out["memory"]["fits"] is True and out["memory"]["worst_total_bytes"] < 80e9
    assert out["report_figures"] == {"experts_per_node_at_no_extra_cost": pytest.approx(3.2),
                                     "max_experts_at_same_cost": 13}
    assert out["pipeline"]["peak_chunk_activations_per_rank"][0] == 17
    assert 135e3 < out["gpu_hours_per_trillion_tokens"] < 225e3
    assert out["budget"]["gpu_hours"] == pytest.approx(14.8 * out["gpu_hours_per_trillion_tokens"])
    assert set(out["time_s"]) >= {"pipeline bubble", "data-parallel reduction"}
    assert out["communication_bytes_per_rank_per_step"]["dispatch/combine inter-node"] > 0


def test_report_layout_as_tables(capsys):
    assert main(REPORT_ARGS) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    assert "fits in 80.00 GB" in text and "GPU-hours per trillion tokens" in text
    assert "3.20 experts per node at no extra cost, up to 13 experts per token" in text


def test_an_hf_model_directory_is_planned_like_its_preset(tmp_path, capsys):
    """A config.json as transformers writes it gives the same model, so the same plan (HF configs carry no
    layout: the batch defaults to one sequence per GPU and 4096 tokens)."""
    from sourcelm.config import load_config

    (tmp_path / "config.json").write_text(json.dumps(load_config("tiny").model.to_hf_dict()))
    args = ["--cluster", "h100", "--nodes", "1", "--ep", "8", "--global-batch", "8", "--seq-len", "256", "--json"]
    assert main(["plan", str(tmp_path), *args]) == 0
    hf = json.loads(capsys.readouterr().out)
    assert main(["plan", "tiny", *args, "--micro-batch", "1", "--dtype", "bf16"]) == 0
    preset = json.loads(capsys.readouterr().out)
    assert hf["model"] == preset["model"] and hf["step_time_s"] == preset["step_time_s"]
    assert hf["memory"]["worst_total_bytes"] == preset["memory"]["worst_total_bytes"]


def test_search_prints_the_fastest_layouts(capsys):
    assert main(["plan", "tiny", "--cluster", "h100", "--nodes", "1", "--global-batch", "16", "--micro-batch", "1",
                 "--search", "--top", "5"]) == 0
    text = capsys.readouterr().out
    assert "5 fastest layouts that fit" in text and "cannot exist" in text


@pytest.mark.slow
def test_this_machine_is_measured(capsys):
    """--cluster cpu measures a matmul, a reduced-model step, a memory copy and the gloo loopback."""
    assert main(["plan", "tiny", "--cluster", "cpu", "--nproc", "2", "--ranks-per-node", "1", "parallel.ep=2",
                 "schedule.micro_batch=4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    cl = out["cluster"]
    assert cl["world"] == 2 and cl["nodes"] == 2 and cl["link_latency"] > 0 and 0 < cl["ib_bw"] < float("inf")
    assert out["assumptions"]["compute_rate"] > 0 and out["step_time_s"] > 0
    assert out["routing"]["inter_node_rows_per_token"] > 0
