"""The zero-bubble W split (`sourcelm.train.weight_grad`): a backward whose weight gradients are deferred, then run
by the store, gives the bits of the plain backward: `ops.linear` (autocast or not, stacked weights), the routed
experts' GEMMs on every backend (`torch._grouped_mm`, the batched matmul of equal groups, the per-expert loop,
the AMX kernel), FP8's Wgrads (the linear's, the
SwiGLU + down projection's, the attention output's), and a whole model (fp32, autocast bf16, FP8)."""

import dataclasses
import gc

import pytest
import torch

from sourcelm.config import load_config
from sourcelm.kernels import amx, ops
from sourcelm.model import build_model
from sourcelm.train.weight_grad import WeightGradStore


def _grads(fn, params, x, deferred: bool, existing: bool = False):
    """Output, x's and each param's gradient of sum(fn(x) * up), plainly or deferred then popped; existing: the
    params start with a gradient (the W accumulates as autograd would)."""
    for p in params:
        p.grad = torch.full_like(p, 0.5) if existing else None
    x = x.detach().clone().requires_grad_()
    store = WeightGradStore()
    with store.recording((0, 0)) if deferred else torch.enable_grad():
        y = fn(x)
    up = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(up)
    if deferred:
        assert all(p.grad is None or existing and bool((p.grad == 0.5).all()) for p in params)  # not yet
        store.seal((0, 0))
        assert len(store) == 1
        assert store.pop((0, 0)) == (0, 0) and len(store) == 0
    return [y.detach(), x.grad] + [p.grad.clone() for p in params]


def _same_bits(fn, params, x, existing=False):
    plain, deferred = _grads(fn, params, x, False, existing), _grads(fn, params, x, True, existing)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(plain, deferred))


def _params(*shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "autocast bf16", "bf16 weights"])
def test_linear_with_stacked_weights(precision, existing):
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    a, b = _params((48, 64), (16, 64), dtype=dtype)
    x = torch.randn(3, 20, 64).to(dtype)

    def fn(x):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "autocast bf16"):
            return ops.linear(x, torch.cat([a, b]))  # the q_a/kv_a and gate/up stacking

    _same_bits(fn, [a, b], x, existing)


def test_fp8_linear_wgrad():
    (w,) = _params((256, 128))
    x = torch.randn(2, 64, 128)

    def fn(x):
        with ops.linear_precision("emulate"):
            return ops.linear(x, w)

    _same_bits(fn, [w], x)


def test_fp8_swiglu_linear_wgrad():
    (w,) = _params((128, 96))
    gu = torch.randn(2, 64, 192)

    def fn(gu):
        with ops.linear_precision("emulate"):
            return ops.swiglu_linear(gu, w)

    _same_bits(fn, [w], gu)


def test_fp8_attention_output_wgrad():
    """o_proj's Wgrad under FP8, from the attention core's E5M6 output (`fp8_attention`); x stands for q, k and v."""
    (w,) = _params((64, 3 * 16))

    def fn(x):
        q, k, v = x[..., :24], x[..., 24:48], x[..., 48:]
        with ops.linear_precision("emulate"):
            return ops.attention_output(q, k, v, 0.3, "auto", w)

    _same_bits(fn, [w], torch.randn(2, 3, 40, 64))


def _expert_ffn(counts, dtype, seed=0):
    w1, w3, w2 = _params((4, 64, 96), (4, 64, 96), (4, 96, 64), seed=seed)
    x = torch.randn(int(sum(counts)), 96, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    return (lambda x: ops.expert_ffn(x, torch.tensor(counts), w1, w2, w3)), [w1, w3, w2], x


def _backend(fn, x) -> str:
    chosen = {}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ops, "_chose", lambda op, backend, *a, **k: chosen.setdefault(op, backend))
        fn(x)
    return chosen["expert_ffn"]


def test_experts_grouped_mm_fp32():
    fn, params, x = _expert_ffn([40, 0, 70, 18], torch.float32)  # uneven and empty groups
    assert _backend(fn, x) == "torch._grouped_mm"
    _same_bits(fn, params, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_bmm_equal_groups(dtype, monkeypatch):
    monkeypatch.setenv("SOURCELM_KERNELS", "torch")  # not the AMX kernel, which takes bf16 groups of 32
    fn, params, x = _expert_ffn([32, 0, 32, 32], dtype)  # a collapsed router: the used experts' groups equal
    assert _backend(fn, x) == "bmm (equal groups)"
    _same_bits(fn, params, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_per_expert_loop(dtype, monkeypatch):
    monkeypatch.setenv("SOURCELM_KERNELS", "torch")
    fn, params, x = _expert_ffn([40, 0, 70, 18], dtype)
    monkeypatch.setattr(ops.expert_matmul, "grouped_mm_supported", lambda *a: False)  # as where it cannot run
    assert _backend(fn, x) == "per-expert loop"
    _same_bits(fn, params, x)


@pytest.mark.skipif(not amx.ready(), reason="no AMX on this CPU (or no C compiler)")
def test_experts_amx_bf16():
    fn, params, x = _expert_ffn([64, 128, 0, 64], torch.bfloat16)
    assert _backend(fn, x) == "AMX"
    _same_bits(fn, params, x)


@pytest.mark.parametrize("precision", ["fp32", "autocast bf16", "fp8 emulate"])
def test_a_model_step_gives_the_plain_backwards_bits(precision):
    """Every parameter of a small model (attention, dense and MoE layers, MTP) gets the same gradient bits; the
    GEMM weights get theirs only when the W runs."""
    cfg = dataclasses.replace(load_config("tiny").model, num_hidden_layers=2)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = []
    for deferred in (False, True):
        model.zero_grad(set_to_none=True)
        store = WeightGradStore()
        with ops.linear_precision("emulate" if precision == "fp8 emulate" else "off"):
            with store.recording((1, 3)) if deferred else torch.enable_grad():
                with torch.autocast("cpu", torch.bfloat16, enabled=precision == "autocast bf16"):
                    out = model(ids, labels=ids, return_logits=False)
            out.loss.backward()
        if deferred:
            store.seal((1, 3))
            waiting = {n for n, p in model.named_parameters() if p.grad is None}
            assert "model.layers.0.self_attn.o_proj.weight" in waiting and "model.layers.1.mlp.experts.w2" in waiting
            assert "model.embed_tokens.weight" not in waiting and "lm_head.weight" not in waiting
            store.pop()
        runs.append({n: p.grad.clone() for n, p in model.named_parameters()})
    plain, deferred = runs
    assert plain.keys() == deferred.keys()
    assert all(torch.equal(plain[n], deferred[n]) for n in plain), [n for n in plain
                                                                  if not torch.equal(plain[n], deferred[n])]


def test_the_store_refuses_out_of_order_ws():
    store = WeightGradStore()
    for key in ((0, 0), (1, 0)):
        with store.recording(key):
            pass
        store.seal(key)
    with pytest.raises(RuntimeError, match=r"the W op of \(1, 0\) found the weight gradients of \(0, 0\)"):
        store.pop((1, 0))
    store.pop()
    with pytest.raises(RuntimeError, match="no deferred weight gradients"):
        store.pop()


def test_a_run_set_lets_its_forward_go():
    """After its W op nothing of a deferred forward stays alive: the store breaks the cycle of autograd nodes,
    sinks and computes that Python's collector cannot free (it leaked a micro-batch's graph and activations per W
    op, ~36 MB a step on the pipeline bench's model)."""
    cfg = load_config("tiny", ["model.hidden_size=64", "model.vocab_size=256"]).model
    model = build_model(cfg)
    ids = torch.randint(0, 256, (1, 33), generator=torch.Generator().manual_seed(0))

    def sinks() -> int:  # counted before and after: other tests' objects do not count
        gc.collect()
        return sum(isinstance(o, ops.WeightGradSink) for o in gc.get_objects())

    before = sinks()
    store = WeightGradStore()
    with store.recording((0, 0)):
        out = model(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward()
    del out
    store.seal((0, 0))
    store.pop((0, 0))
    assert sinks() == before
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() == 2 and
               p.shape[0] != cfg.vocab_size)  # the W op ran: the deferred GEMMs' weights have their gradients
