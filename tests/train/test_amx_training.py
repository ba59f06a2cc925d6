"""Training through the AMX kernels (`sourcelm.kernels.amx`): both run in the trainer's bf16 step, the run
resumes bit for bit, and its losses follow the torch path's (bmm attention, oneDNN grouped matmuls)."""

import json

import numpy as np
import pytest

from sourcelm.kernels import amx
from sourcelm.train.loop import Trainer

pytestmark = pytest.mark.skipif(not amx.ready(), reason="no AMX on this CPU (or no C compiler)")

# head sizes the attention kernel takes (q/k 32, v 32; sequence 32); the SMALL experts (64 x 32) fit the grouped one
KERNEL_SHAPES = ["train.dtype=bfloat16", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=16",
                 "model.v_head_dim=32", "schedule.steps=4", "logging.valid_every=0"]


def _losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_kernels_train_and_resume_bit_identically(small_config, digest, tmp_path, monkeypatch):
    calls = {"attention": 0, "grouped": 0}
    for name, key in (("causal_attention", "attention"), ("grouped_linear", "grouped")):
        real = getattr(amx, name)
        monkeypatch.setattr(amx, name, lambda *a, _real=real, _key=key: calls.__setitem__(_key, calls[_key] + 1)
                            or _real(*a))
    straight = Trainer(small_config(*KERNEL_SHAPES), tmp_path / "straight", progress=False)
    straight.fit()
    assert calls["attention"] > 0 and calls["grouped"] > 0
    split = Trainer(small_config(*KERNEL_SHAPES), tmp_path / "split", progress=False)
    split.fit(stop_after=2)
    resumed = Trainer(small_config(*KERNEL_SHAPES), tmp_path / "split", progress=False)
    assert resumed.resume() and resumed.state.step == 2
    resumed.fit()
    assert digest(resumed.model) == digest(straight.model)

    torch_path = Trainer(small_config(*KERNEL_SHAPES, "model.attn_impl=bmm"), tmp_path / "torch", progress=False)
    monkeypatch.setattr(amx, "grouped_linear_takes", lambda *a: False)
    torch_path.fit()
    # fp32 scores and softmax in the kernel, bf16-rounded scores in the bmm path: close, not equal
    np.testing.assert_allclose(_losses(tmp_path / "straight"), _losses(tmp_path / "torch"), rtol=2e-2)
