"""The fused, chunked head + cross-entropy against the plain reference (logits, then F.cross_entropy),
the model's two loss paths against each other, and empty batches through the grouped experts."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sourcelm.config import load_config
from sourcelm.kernels.reference import chunk_loss_and_grad
from sourcelm.model import build_model
from sourcelm.model.loss import linear_cross_entropy
from sourcelm.model.moe import MoE


def tiny(**over):
    return dataclasses.replace(load_config("tiny").model, **over)


def _problem(n=300, hidden=48, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * 0.2
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::7] = -100
    return h, w, labels


def _run(fn, h, w, labels, dtype=torch.float32):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = fn(h, w, labels)
    (0.37 * loss).backward()
    return loss.detach(), h.grad, w.grad


def _plain(h, w, labels):
    return F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_fn", [None, chunk_loss_and_grad], ids=["default", "torch"])
@pytest.mark.parametrize("chunk_rows", [None, 1, 64, 97, 300])
def test_fused_matches_plain_cross_entropy_fp32(chunk_rows, chunk_fn):
    """The device's default per-chunk step (the native kernel on this CPU where it builds) and the torch code."""
    h, w, labels = _problem()
    ref = _run(_plain, h, w, labels)
    got = _run(lambda a, b, y: linear_cross_entropy(a, b, y, chunk_rows, chunk_fn), h, w, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    for i in (1, 2):  # sums in another order: differences at the ulp level of the largest entries
        torch.testing.assert_close(got[i], ref[i], rtol=1e-5, atol=1e-5 * float(ref[i].abs().max()))
    assert got[1][::7].abs().max() == 0  # ignored positions get no gradient


def test_fused_bf16_is_as_close_to_fp32_as_plain_autocast():
    h, w, labels = _problem(n=512, hidden=64, vocab=4000)
    truth = _run(_plain, h, w, labels)
    plain = _run(_plain, h, w, labels, torch.bfloat16)
    fused = _run(lambda a, b, y: linear_cross_entropy(a, b, y, 100), h, w, labels, torch.bfloat16)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    for i in range(3):
        # the same bf16 matmuls; the fused path rounds the head's gradient per chunk, not once in bf16
        assert rel(fused[i], truth[i]) < 1.2 * rel(plain[i], truth[i]) + 1e-6
        assert rel(fused[i], truth[i]) < 1e-2


def test_fused_is_deterministic_and_no_grad_gives_the_same_loss():
    h, w, labels = _problem()
    a, b = _run(linear_cross_entropy, h, w, labels), _run(linear_cross_entropy, h, w, labels)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with torch.no_grad():
        assert torch.equal(linear_cross_entropy(h, w, labels), a[0])


def test_model_fused_loss_path_matches_logits_path():
    cfg = tiny(num_nextn_predict_layers=2)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 33))
    inputs, labels = ids[:, :-1], ids[:, 1:].clone()
    labels[1, 5] = -100
    outs, grads = [], []
    for return_logits in (True, False):
        model = build_model(cfg, seed=0)
        out = model(inputs, labels=labels, mtp_weight=0.3, balance_alpha=1e-3, return_logits=return_logits)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert outs[0].logits is not None and outs[1].logits is None
    for part in ("loss", "main_loss", "mtp_loss", "balance_loss"):
        torch.testing.assert_close(getattr(outs[1], part), getattr(outs[0], part), rtol=1e-6, atol=0)
    assert torch.equal(outs[0].expert_counts, outs[1].expert_counts)
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    worst = max(float((grads[1][n] - grads[0][n]).norm() / grads[0][n].norm()) for n in grads[0])
    assert worst < 1e-5


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)])
def test_moe_on_an_empty_batch(impl, shape):
    cfg = tiny(moe_impl=impl)
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(*shape, cfg.hidden_size, requires_grad=True)
    y, counts, balance = layer(x, balance_alpha=1e-4)
    assert y.shape == x.shape and counts.sum() == 0 and balance.item() == 0
    (y.sum() + balance).backward()
    grad = layer.experts.w1.grad
    if impl == "grouped":  # the fast path keeps the experts in the graph (zero gradient, not None)
        assert grad is not None and grad.abs().sum() == 0
    assert layer.shared_experts.up_proj.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("chunk_rows,group_chunks", [(64, 1), (64, 2), (97, 3)])
def test_fused_matches_plain_when_the_weight_gradient_is_split_into_row_groups(monkeypatch, chunk_rows, group_chunks):
    """Heads too large for one kept [rows, V] gradient sum their weight gradient over row groups."""
    from sourcelm.model import loss as loss_mod
    monkeypatch.setattr(loss_mod, "_group_rows", lambda n, vocab, chunk, itemsize: min(n, group_chunks * chunk))
    h, w, labels = _problem()
    ref = _run(_plain, h, w, labels)
    got = _run(lambda a, b, y: linear_cross_entropy(a, b, y, chunk_rows), h, w, labels)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=0)
    for i in (1, 2):
        torch.testing.assert_close(got[i], ref[i], rtol=1e-5, atol=1e-5 * float(ref[i].abs().max()))
