"""The kernel dispatch point (`sourcelm.kernels.ops`): `SOURCELM_KERNELS=torch` runs the torch reference of every
op everywhere, and with the kernels on, every op agrees with it — op by op and through the whole model."""

import dataclasses
import logging

import pytest
import torch

from sourcelm.config import load_config
from sourcelm.kernels import build, ops
from sourcelm.model import build_model

FAST = ("C", "AMX")  # the backends that are not torch code


@pytest.fixture
def choices(monkeypatch):
    """The (op, backend) pairs `ops` chose from here on."""
    monkeypatch.setattr(ops, "_logged", set())
    return lambda: {(key[0], key[1]) for key in ops._logged}


def _tiny(dtype=torch.float32):
    cfg = dataclasses.replace(load_config("tiny").model, vocab_size=512, num_hidden_layers=2)
    model = build_model(cfg, seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 65), generator=g)
    return model, ids


def _loss_and_grads(model, ids, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        out = model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_torch_mode_runs_no_kernel_anywhere(monkeypatch, choices):
    """Forward, backward and the optimizer's choice in bf16 (where the C and AMX kernels would all run):
    with SOURCELM_KERNELS=torch every op reports its torch code."""
    monkeypatch.setenv("SOURCELM_KERNELS", "torch")
    model, ids = _tiny()
    _loss_and_grads(model, ids, torch.bfloat16)
    assert ops.adamw_backend(torch.device("cpu")) == "torch"
    assert not ops.native_runs(torch.device("cpu"))
    chosen = choices()
    ops_seen = {op for op, _ in chosen}
    assert {"rms_norm", "rope", "swiglu", "cross_entropy_chunk", "route_topk", "group_by_expert", "dispatch_rows",
            "combine_rows", "expert_ffn", "causal_attention", "adamw"} <= ops_seen
    assert not [c for c in chosen if c[1] in FAST], chosen


@pytest.mark.skipif(not build.available(), reason="no C compiler: only the torch code runs here")
def test_auto_mode_runs_the_kernels_and_logs_each_choice_once(choices, caplog):
    model, ids = _tiny()
    with caplog.at_level(logging.INFO, logger="sourcelm.kernels.ops"):
        _loss_and_grads(model, ids, torch.bfloat16)
        _loss_and_grads(model, ids, torch.bfloat16)
    chosen = choices()
    assert {("rms_norm", "C"), ("rope", "C"), ("swiglu", "C"), ("route_topk", "C"), ("dispatch_rows", "C")} <= chosen
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(set(messages)) == len(ops._logged)  # once per (op, backend, device and dtype)


@pytest.mark.skipif(not build.available(), reason="no C compiler: only the torch code runs here")
def test_model_with_kernels_equals_the_torch_reference_in_fp32(monkeypatch):
    """fp32 loss and every parameter's gradient, kernels on vs SOURCELM_KERNELS=torch: equal up to summation
    order (the routing, discrete, picks the same experts)."""
    model, ids = _tiny()
    loss, grads = _loss_and_grads(model, ids, torch.float32)
    monkeypatch.setenv("SOURCELM_KERNELS", "torch")
    ref_loss, ref_grads = _loss_and_grads(model, ids, torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=1e-5 * max(1.0, float(ref.abs().max())),
                                   msg=name)


def _op_cases():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 40, 64, generator=g)
    w = torch.rand(64, generator=g) + 0.5
    q = torch.randn(2, 3, 40, 16, generator=g)
    cos, sin = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    scores, bias = torch.rand(300, 16, generator=g), torch.randn(16, generator=g) * 0.1
    logits, labels = torch.randn(50, 100, generator=g), torch.randint(0, 100, (50,), generator=g)
    gu = torch.randn(30, 64, generator=g)
    return {
        "rms_norm": (lambda: ops.rms_norm(x, w, 1e-6), 1e-6),
        "rms_norm bf16 out": (lambda: ops.rms_norm(x, w, 1e-6, torch.bfloat16).float(), 1e-2),
        "rope": (lambda: ops.rope(q, cos, sin), 1e-6),
        "swiglu": (lambda: ops.swiglu(gu), 1e-6),
        "route_topk": (lambda: ops.route_topk(scores, bias, 4, 2, 2, 4), 0),
        "cross_entropy_chunk": (lambda: ops.cross_entropy_chunk(torch.device("cpu"))(logits, labels, None), 1e-6),
    }


@pytest.mark.skipif(not build.available(), reason="no C compiler: only the torch code runs here")
@pytest.mark.parametrize("op", list(_op_cases()))
def test_each_op_agrees_with_its_torch_reference(op, monkeypatch):
    fn, tol = _op_cases()[op]
    got = fn()
    monkeypatch.setenv("SOURCELM_KERNELS", "torch")
    want = fn()
    if tol == 0:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_a_bad_mode_names_the_variable_and_the_values(monkeypatch):
    monkeypatch.setenv("SOURCELM_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match=r"SOURCELM_KERNELS='cuda-please'.*auto.*torch"):
        ops.mode()
