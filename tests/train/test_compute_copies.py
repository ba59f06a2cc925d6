"""The trainer's bf16 compute copies of the matmul weights (`train/optim.py`) change the speed, not the bits."""

import pytest
import torch

from sourcelm.kernels import build
from sourcelm.model.transformer import DeepseekV3
from sourcelm.train.loop import Trainer

pytestmark = pytest.mark.skipif(not build.available(), reason="no C compiler: the native kernels do not build")


def _train(cfg, run_dir, steps=4):
    tr = Trainer(cfg, run_dir, progress=False)
    losses = [tr.train_step()["loss"] for _ in range(steps)]
    return tr, losses


@pytest.mark.parametrize("micro_batch", [2, 4])  # two micro-batches (folded in fp32) and one
def test_training_on_compute_copies_gives_the_same_bits(small_config, digest, tmp_path, monkeypatch, micro_batch):
    cfg = lambda: small_config("train.dtype=bfloat16", f"schedule.micro_batch={micro_batch}")
    tr, losses = _train(cfg(), tmp_path / "copies")
    copied = set(tr.dense_opt.copies) | set(tr.expert_opt.copies)
    assert copied == set(tr.model.matmul_weights()) and "model.layers.1.mlp.experts.w2" in copied
    assert "lm_head.weight" not in copied and "model.layers.1.mlp.gate.weight" not in copied
    # the model's own parameters stay the fp32 masters, and each copy is its master rounded
    for name, copy in {**tr.dense_opt.copies, **tr.expert_opt.copies}.items():
        master = tr.model.get_parameter(name)
        assert master.dtype == torch.float32 and torch.equal(copy, master.detach().bfloat16()), name
    with_copies = digest(tr.model)
    monkeypatch.setattr(DeepseekV3, "matmul_weights", lambda self: [])
    tr_plain, plain_losses = _train(cfg(), tmp_path / "plain")
    assert not tr_plain.dense_opt.copies
    assert losses == plain_losses and digest(tr_plain.model) == with_copies


def test_a_resumed_run_computes_on_the_loaded_weights(small_config, digest, tmp_path):
    """Resuming rewrites the copies from the loaded masters: the resumed run continues bit-identically."""
    cfg = lambda: small_config("train.dtype=bfloat16", "checkpoint.every=2")
    straight, _ = _train(cfg(), tmp_path / "straight")
    first, _ = _train(cfg(), tmp_path / "resumed", steps=2)
    first.save()
    resumed = Trainer(cfg(), tmp_path / "resumed", progress=False)
    assert resumed.resume()
    for _ in range(2):
        resumed.train_step()
    assert digest(resumed.model) == digest(straight.model)
