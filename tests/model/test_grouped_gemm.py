"""The AMX grouped matmul of the routed experts (`kernels/grouped_gemm.c`) against fp64 and torch's grouped
matmul: values, both gradients, empty groups, thread-count independence, and what it declines. Runs where
the CPU has AMX; elsewhere only the decline is checked (the torch code runs there)."""

import pytest
import torch

from sourcelm.model import grouped_experts as ge
from sourcelm.model import native

amx = pytest.mark.skipif(not native.grouped_gemm_ready(), reason="no AMX on this CPU (or no C compiler)")


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


@amx
@pytest.mark.parametrize("n,k", [(256, 256), (256, 128), (64, 96)])
def test_values_and_gradients_match_fp64(n, k):
    counts, x, w, up = _problem([64, 0, 192, 32, 0, 96], n, k)
    y, gx, gw = _run(lambda a, b: native.grouped_linear(a, b, counts), x, w, up)
    ry, rgx, rgw = _fp64(counts, x, w, up)
    assert _within_one_bf16_rounding(y, ry)
    assert _within_one_bf16_rounding(gx, rgx)
    assert _within_one_bf16_rounding(gw, rgw)
    assert gw[1].abs().max() == 0 and gw[4].abs().max() == 0  # empty groups: zero gradient, no garbage


@amx
def test_agrees_with_torch_grouped_mm():
    """Same inputs through torch._grouped_mm (oneDNN per group): equal up to bf16 rounding of the fp32 sums."""
    counts, x, w, up = _problem([128, 64, 0, 320], 128, 256, seed=1)
    offs = counts.cumsum(0).to(torch.int32)
    got = _run(lambda a, b: native.grouped_linear(a, b, counts), x, w, up)
    ref = _run(lambda a, b: torch._grouped_mm(a, b.transpose(-2, -1), offs=offs), x, w, up)
    for a, b in zip(got, ref):
        ulp = torch.finfo(torch.bfloat16).eps * b.float().abs() + 1e-3
        assert bool(((a.float() - b.float()).abs() <= 2 * ulp).all())


@amx
def test_bits_do_not_depend_on_the_thread_count():
    counts, x, w, up = _problem([96, 32, 224], 256, 128, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(lambda a, b: native.grouped_linear(a, b, counts), x, w, up)
        torch.set_num_threads(3)
        three = _run(lambda a, b: native.grouped_linear(a, b, counts), x, w, up)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, three):
        assert torch.equal(a, b)


@amx
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
    real = native.grouped_linear
    monkeypatch.setattr(native, "grouped_linear", lambda *a: calls.append(1) or real(*a))

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, *ws)]
        y = ge.expert_ffn(leaves[0], counts, *leaves[1:])
        y.backward(up)
        return [y.detach(), *(t.grad for t in leaves)]

    got = run()
    assert len(calls) == 2
    monkeypatch.setattr(native, "grouped_linear_takes", lambda *a: False)
    ref = run()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.float().abs().max().item())


def test_declines_what_it_cannot_run():
    counts, x, w, _ = _problem([64, 32], 64, 64)
    assert not native.grouped_linear_takes(x.float(), w.float(), counts)  # fp32: torch's code
    assert not native.grouped_linear_takes(x[:80], w, torch.tensor([48, 32]))  # a group not a multiple of 32
    assert not native.grouped_linear_takes(x[:, :48], w[..., :48], counts)  # K not a multiple of 32
    assert not native.grouped_linear_takes(x[:64], w, torch.tensor([64, 32]))  # counts do not sum to the rows
    if not native.grouped_gemm_ready():
        assert not native.grouped_linear_takes(x, w, counts)
        with pytest.raises(ValueError, match="AMX"):
            native.grouped_linear(x, w, counts)
