"""`train.compile` (DeepseekV3.compile_blocks): the compiled blocks compute what the eager ones do, and a
compiled run stays deterministic: N steps straight == k steps + resume + N - k steps, bit for bit."""

import json

import numpy as np
import pytest
import torch

from sourcelm.kernels import ops
from sourcelm.kernels.reference import chunk_loss_and_grad
from sourcelm.train.loop import Trainer


@pytest.fixture
def config(small_config):
    def make(*extra):
        return small_config("schedule.steps=4", "logging.valid_every=0", *extra)
    return make


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes_bit_identically(config, digest, tmp_path):
    eager = Trainer(config(), tmp_path / "eager", progress=False)
    eager_losses = [eager.train_step()["loss"] for _ in range(4)]

    straight = Trainer(config("train.compile=true"), tmp_path / "straight", progress=False)
    straight.fit()
    split = Trainer(config("train.compile=true"), tmp_path / "split", progress=False)
    split.fit(stop_after=2)
    resumed = Trainer(config("train.compile=true"), tmp_path / "split", progress=False)
    assert resumed.resume() and resumed.state.step == 2
    resumed.fit()
    assert digest(resumed.model) == digest(straight.model)

    # the compiled kernels fuse and reorder float operations: close to eager, not equal
    compiled_losses = [r["loss"] for r in map(json.loads, straight.metrics.path.read_text().splitlines())
                       if "loss" in r]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    assert type(straight.model.model.layers[0].attention_block).__name__ != "method"  # really compiled
    # the fused loss's per-chunk step: compiled too, unless the native CPU kernel (faster) runs it
    assert straight.model.ce_chunk is not chunk_loss_and_grad
    assert (straight.model.ce_chunk is None) == (
        ops.cross_entropy_chunk(torch.device("cpu")) is not chunk_loss_and_grad)
    # the router and the FFNs: compiled only where the C kernels (faster or equal) do not run them
    moe = next(layer.mlp for layer in straight.model.model.layers if layer.is_moe)
    assert (moe.gate._compiled_call_impl is None) == (straight.model.ce_chunk is None)
    assert torch.equal(straight.model.model.layers[0].mlp.gate_proj.weight, straight.model.state_dict()[
        "model.layers.0.mlp.gate_proj.weight"])  # names unchanged by compilation
