"""`train.compile` (DeepseekV3.compile_blocks): the compiled blocks compute what the eager ones do, and a
compiled run stays deterministic: N steps straight == k steps + resume + N - k steps, bit for bit."""

import hashlib
import json

import numpy as np
import pytest
import torch

from sourcelm.config import load_config
from sourcelm.tokens.indexed import ShardWriter
from sourcelm.train.loop import Trainer

SMALL = [
    "model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=32",
    "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=2", "model.q_lora_rank=32",
    "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
    "model.n_routed_experts=8", "model.num_experts_per_tok=4", "model.n_group=4", "model.topk_group=2",
    "data.seq_len=32", "schedule.steps=4", "schedule.global_batch=4", "schedule.micro_batch=2",
    "schedule.warmup_steps=2", "checkpoint.every=2", "logging.valid_every=0", "logging.tensorboard=false",
    "logging.progress=false",
]


def _digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture
def config(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "tokens" / "shard_00000") as w:
        for _ in range(40):
            w.add_document(rng.integers(2, 512, int(rng.integers(20, 120))).astype(np.uint16))

    def make(*extra):
        return load_config("tiny", SMALL + [f"data.train=['{tmp_path / 'tokens'}']", *extra])
    return make


@pytest.mark.slow
def test_compiled_training_matches_eager_and_resumes_bit_identically(config, tmp_path):
    eager = Trainer(config(), tmp_path / "eager", progress=False)
    eager_losses = [eager.train_step()["loss"] for _ in range(4)]

    straight = Trainer(config("train.compile=true"), tmp_path / "straight", progress=False)
    straight.fit()
    split = Trainer(config("train.compile=true"), tmp_path / "split", progress=False)
    split.fit(stop_after=2)
    resumed = Trainer(config("train.compile=true"), tmp_path / "split", progress=False)
    assert resumed.resume() and resumed.state.step == 2
    resumed.fit()
    assert _digest(resumed.model) == _digest(straight.model)

    # the compiled kernels fuse and reorder float operations: close to eager, not equal
    compiled_losses = [r["loss"] for r in map(json.loads, straight.metrics.path.read_text().splitlines()) if "loss" in r]
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-4)
    assert type(straight.model.model.layers[0].attention_block).__name__ != "method"  # really compiled
    assert torch.equal(straight.model.model.layers[0].mlp.gate_proj.weight, straight.model.state_dict()[
        "model.layers.0.mlp.gate_proj.weight"])  # names unchanged by compilation
