"""The AMX kernels (`sourcelm.kernels.amx`): the routed experts' grouped matmul against fp64 and torch's grouped
matmul, causal attention against fp64 and the bmm path; values, gradients, empty groups, causality,
thread-count independence, and what each declines. Runs where the CPU has AMX; elsewhere only the
declines are checked (the torch code runs there)."""

import pytest
import torch

from sourcelm.kernels import amx, ops
from sourcelm.kernels.attention import bmm_causal
from sourcelm.kernels.reference import eager_causal_attention

needs_amx = pytest.mark.skipif(not amx.ready(), reason="no AMX on this CPU (or no C compiler)")


def _problem(counts, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), k, generator=g).bfloat16()
    w = torch.randn(len(counts), n, k, generator=g).bfloat16()
    up = torch.randn(x.shape[0], n, generator=g).bfloat16()
    return counts, x, w, up


def _run(fn, x, w, up):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(up)
    return y.detach(), x.grad, w.grad


def _fp64(counts, x, w, up):
    """out, grad x, grad w in fp64 from the same bf16 inputs, group by group."""
    x64, w64, up64 = x.double(), w.double(), up.double()
    ys, gxs, gws = [], [], []
    for e, (xe, ue) in enumerate(zip(x64.split(counts.tolist()), up64.split(counts.tolist()))):
        ys.append(xe @ w64[e].T)
        gxs.append(ue @ w64[e])
        gws.append(ue.T @ xe)
    return torch.cat(ys), torch.cat(gxs), torch.stack(gws)


def _within_one_bf16_rounding(got, exact):
    """got is exact rounded to bf16 after an fp32 sum: off by at most one bf16 ulp plus fp32 summation error."""
    scale = exact.abs().amax().clamp_min(1e-30)
    tol = torch.finfo(torch.bfloat16).eps * exact.abs() + 1e-5 * scale
    return bool(((got.double() - exact).abs() <= tol).all())


@needs_amx
@pytest.mark.parametrize("n,k", [(256, 256), (256, 128), (64, 96)])
def test_values_and_gradients_match_fp64(n, k):
    counts, x, w, up = _problem([64, 0, 192, 32, 0, 96], n, k)
    y, gx, gw = _run(lambda a, b: amx.grouped_linear(a, b, counts), x, w, up)
    ry, rgx, rgw = _fp64(counts, x, w, up)
    assert _within_one_bf16_rounding(y, ry)
    assert _within_one_bf16_rounding(gx, rgx)
    assert _within_one_bf16_rounding(gw, rgw)
    assert gw[1].abs().max() == 0 and gw[4].abs().max() == 0  # empty groups: zero gradient, no garbage


@needs_amx
def test_agrees_with_torch_grouped_mm():
    """Same inputs through torch._grouped_mm (oneDNN per group): equal up to bf16 rounding of the fp32 sums."""
    counts, x, w, up = _problem([128, 64, 0, 320], 128, 256, seed=1)
    offs = counts.cumsum(0).to(torch.int32)
    got = _run(lambda a, b: amx.grouped_linear(a, b, counts), x, w, up)
    ref = _run(lambda a, b: torch._grouped_mm(a, b.transpose(-2, -1), offs=offs), x, w, up)
    for a, b in zip(got, ref):
        ulp = torch.finfo(torch.bfloat16).eps * b.float().abs() + 1e-3
        assert bool(((a.float() - b.float()).abs() <= 2 * ulp).all())


@needs_amx
def test_bits_do_not_depend_on_the_thread_count():
    counts, x, w, up = _problem([96, 32, 224], 256, 128, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(lambda a, b: amx.grouped_linear(a, b, counts), x, w, up)
        torch.set_num_threads(3)
        three = _run(lambda a, b: amx.grouped_linear(a, b, counts), x, w, up)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


@needs_amx
def test_expert_ffn_runs_the_kernel_and_matches_the_torch_path(monkeypatch):
    """A whole routed-expert SwiGLU in bf16 with uneven groups: the kernel path against the torch path."""
    g = torch.Generator().manual_seed(3)
    e, h, i = 8, 128, 64
    counts = torch.tensor([64, 0, 128, 64, 192, 0, 64, 64])
    x = torch.randn(int(counts.sum()), h, generator=g).bfloat16()
    ws = [torch.randn(e, i, h, generator=g).bfloat16() / 8, torch.randn(e, h, i, generator=g).bfloat16() / 8,
          torch.randn(e, i, h, generator=g).bfloat16() / 8]
    up = torch.randn(x.shape[0], h, generator=g).bfloat16()
    calls = []
    real = amx.grouped_linear
    monkeypatch.setattr(amx, "grouped_linear", lambda *a: calls.append(1) or real(*a))

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, *ws)]
        y = ops.expert_ffn(leaves[0], counts, *leaves[1:])
        y.backward(up)
        return [y.detach(), *(t.grad for t in leaves)]

    got = run()
    assert len(calls) == 2
    monkeypatch.setattr(amx, "grouped_linear_takes", lambda *a: False)
    ref = run()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


def test_declines_what_it_cannot_run():
    counts, x, w, _ = _problem([64, 32], 64, 64)
    assert not amx.grouped_linear_takes(x.float(), w.float(), counts)  # fp32: torch's code
    assert not amx.grouped_linear_takes(x[:80], w, torch.tensor([48, 32]))  # a group not a multiple of 32
    assert not amx.grouped_linear_takes(x[:, :48], w[..., :48], counts)  # K not a multiple of 32
    assert not amx.grouped_linear_takes(x[:64], w, torch.tensor([64, 32]))  # counts do not sum to the rows
    if not amx.ready():
        assert not amx.grouped_linear_takes(x, w, counts)
        with pytest.raises(ValueError, match="AMX"):
            amx.grouped_linear(x, w, counts)


# ------------------------------------------------------------------------------------ causal attention

def _attention_problem(b, h, t, d, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, t, d, generator=g) for _ in range(2))
    v, up = (torch.randn(b, h, t, dv, generator=g) for _ in range(2))
    return q, k, v, up, d ** -0.5


def _attention_run(fn, q, k, v, up, scale, dtype):
    leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, scale)
    out.backward(up.to(dtype))
    return [out.detach()] + [x.grad for x in leaves]


@needs_amx
@pytest.mark.parametrize("b,h,t,d,dv", [(2, 4, 96, 48, 32), (1, 3, 64, 64, 64), (2, 2, 160, 16, 32),
                                        (1, 1, 512, 192, 128)])  # the last: DeepSeek-V3's own head sizes
def test_attention_matches_fp64_at_bf16_level(b, h, t, d, dv):
    """Output and the three gradients against fp64: at bf16's level and no further off than the bmm path (which
    rounds the scores to bf16 before the softmax; the kernel keeps them in fp32)."""
    problem = _attention_problem(b, h, t, d, dv)
    truth = _attention_run(eager_causal_attention, *problem, torch.float64)
    got = _attention_run(amx.causal_attention, *problem, torch.bfloat16)
    bmm = _attention_run(bmm_causal, *problem, torch.bfloat16)
    for name, tr, a, m in zip(("out", "dq", "dk", "dv"), truth, got, bmm):
        err, err_bmm = float((a.double() - tr).norm() / tr.norm()), float((m.double() - tr).norm() / tr.norm())
        assert err < 0.006 and err <= 1.1 * err_bmm, (name, err, err_bmm)


@needs_amx
def test_attention_is_causal():
    """Changing the last key and value changes no output row before the last, and no gradient of earlier keys."""
    q, k, v, up, scale = _attention_problem(1, 2, 64, 48, 32, seed=1)
    base = _attention_run(amx.causal_attention, q, k, v, up * 0 + 1, scale, torch.bfloat16)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1] += 5
    v2[:, :, -1] -= 5
    moved = _attention_run(amx.causal_attention, q, k2, v2, up * 0 + 1, scale, torch.bfloat16)
    assert torch.equal(base[0][:, :, :-1], moved[0][:, :, :-1])
    assert not torch.equal(base[0][:, :, -1], moved[0][:, :, -1])
    assert torch.equal(base[1][:, :, :-1], moved[1][:, :, :-1])  # dq of earlier queries


@needs_amx
def test_attention_bits_do_not_depend_on_the_thread_count():
    problem = _attention_problem(3, 2, 96, 48, 32, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _attention_run(amx.causal_attention, *problem, torch.bfloat16)
        torch.set_num_threads(3)
        three = _attention_run(amx.causal_attention, *problem, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


@needs_amx
def test_mla_runs_the_kernel_under_auto_in_bf16():
    """The tiny preset's attention layer in bf16: "auto" picks the kernel and agrees with "bmm"."""
    import dataclasses

    from sourcelm.config import load_config
    from sourcelm.model.attention import MLA
    from sourcelm.model.norm_rope import RotaryEmbedding

    cfg = load_config("tiny").model
    torch.manual_seed(0)
    attn = MLA(dataclasses.replace(cfg)).bfloat16()
    cos, sin = RotaryEmbedding(cfg)(torch.arange(64), torch.float32)
    x = torch.randn(2, 64, cfg.hidden_size).bfloat16()
    outs = []
    for impl in ("auto", "bmm"):
        attn.impl = impl
        attn.zero_grad()
        y = attn(x, cos, sin)
        y.float().square().sum().backward()
        outs.append([y.detach().float(), attn.o_proj.weight.grad.float(), attn.kv_b_proj.weight.grad.float()])
    for a, b in zip(*outs):
        assert float((a - b).norm() / b.norm()) < 0.02


def test_attention_declines_what_it_cannot_run():
    q, k, v, _, _ = _attention_problem(1, 2, 64, 48, 32)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    assert not amx.attention_takes(q.float(), k.float(), v.float())  # fp32: the bmm path
    assert not amx.attention_takes(q[:, :, :40], k[:, :, :40], v[:, :, :40])  # T not a multiple of 32
    assert not amx.attention_takes(q[..., :40], k[..., :40], v)  # D not a multiple of 16
    assert not amx.attention_takes(q, k, v[..., :16])  # Dv not a multiple of 32
    if not amx.ready():
        with pytest.raises(ValueError, match="AMX"):
            amx.causal_attention(q, k, v, 0.1)
