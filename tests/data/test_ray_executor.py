"""The Ray executor gives the local executor's bytes (a local Ray instance, two CPUs)."""

import pytest

from sourcelm.data.pipeline.executors import LocalExecutor, RayExecutor
from sourcelm.data.pipeline.plan import load_plan
from sourcelm.data.pipeline.run import run_plan
from tests.data.pipeline_fixtures import make_inputs, output_bytes, write_pipeline


@pytest.mark.slow
def test_ray_and_local_outputs_are_byte_identical(tmp_path):
    pytest.importorskip("ray")
    make_inputs(tmp_path / "data", n_jsonl_files=3)
    plan = load_plan(write_pipeline(tmp_path))
    local = run_plan(plan, tmp_path / "local", LocalExecutor(2), workers=2, show_progress=False)
    ray_stats = run_plan(plan, tmp_path / "ray", RayExecutor(2), workers=2, show_progress=False)
    assert ray_stats["executor"] == "ray"
    assert output_bytes(tmp_path / "ray") == output_bytes(tmp_path / "local")
    assert ray_stats["documents_kept"] == local["documents_kept"] > 0
