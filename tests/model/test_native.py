"""The native CPU kernels (the fused loss's per-chunk step, RMSNorm, the routed experts' rows, RoPE, SwiGLU,
the router) against their torch code and fp64."""

import dataclasses
import os
import shutil

import pytest
import torch

from sourcelm.config import load_config
from sourcelm.kernels import build, cpu_fused, cpu_moe, ops, reference
from sourcelm.kernels.reference import IGNORE, chunk_loss_and_grad, rms_norm, rotate_pairs
from sourcelm.model.moe import Router
from sourcelm.model.norm_rope import RMSNorm, apply_rope

# a machine with a C compiler must build the kernel; only one without may skip
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def _chunk(dtype, rows=300, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[::7] = IGNORE
    return logits, labels


def _both(logits, labels):
    ref_grad, got_grad = torch.empty_like(logits), torch.full_like(logits, 7.0)
    ref = chunk_loss_and_grad(logits, labels, ref_grad)
    got = cpu_fused.chunk_loss_and_grad(logits, labels, got_grad)
    return ref, ref_grad, got, got_grad


def test_kernel_builds_and_is_the_cpu_default():
    assert build.available()
    assert ops.cross_entropy_chunk(torch.device("cpu")) is cpu_fused.chunk_loss_and_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_torch_step(dtype):
    logits, labels = _chunk(dtype)
    ref, ref_grad, got, got_grad = _both(logits, labels)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    assert got_grad[::7].abs().max() == 0  # ignored rows: zero gradient, written over the 7s
    if dtype == torch.float32:
        torch.testing.assert_close(got_grad, ref_grad, rtol=1e-5, atol=1e-7)
    else:  # the same fp32 value up to a few ulps, rounded to bf16: equal or one bf16 ulp apart
        ulp = torch.finfo(torch.bfloat16).eps * ref_grad.float().abs().clamp_min(torch.finfo(torch.float32).tiny)
        assert bool(((got_grad.float() - ref_grad.float()).abs() <= ulp).all())
        assert float((got_grad != ref_grad).float().mean()) < 1e-3
    # the target column carries the -1 of the one-hot; a row of the gradient sums to 0
    row = 1
    assert float(got_grad[row, labels[row]]) < 0
    assert abs(float(got_grad[row].double().sum())) < 1e-2


def test_kernel_is_as_accurate_as_the_torch_step_against_fp64():
    logits, labels = _chunk(torch.float32, rows=64, vocab=4096)
    logits[0, :100] = -200.0  # far below the row's max: exp underflows (clamped) to ~0
    x = logits.double()
    valid = labels != IGNORE
    truth = x.softmax(-1)
    truth[valid, labels[valid]] -= 1
    truth[~valid] = 0
    truth_loss = float((x.logsumexp(-1) - x.gather(1, labels.clamp_min(0)[:, None]).squeeze(1))[valid].sum())

    def errors(step):
        grad = torch.empty_like(logits)
        loss = float(step(logits, labels, grad))
        diff = (grad.double() - truth).abs()
        big = truth.abs() > 1e-30
        return abs(loss - truth_loss) / truth_loss, float(diff.max()), float((diff[big] / truth.abs()[big]).max())

    ref, got = errors(chunk_loss_and_grad), errors(cpu_fused.chunk_loss_and_grad)
    assert got[0] < 1e-6
    assert got[1] <= 1.1 * ref[1] and got[2] <= 1.1 * ref[2]  # absolute and relative error of the gradient
    assert got[2] < 1e-5


def test_kernel_without_gradient_gives_the_same_loss():
    logits, labels = _chunk(torch.bfloat16)
    grad = torch.empty_like(logits)
    assert torch.equal(cpu_fused.chunk_loss_and_grad(logits, labels, None),
                       cpu_fused.chunk_loss_and_grad(logits, labels, grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", [chunk_loss_and_grad, cpu_fused.chunk_loss_and_grad], ids=["torch", "native"])
def test_gradient_may_overwrite_the_logits(step, dtype):
    """The fused loss lets the head's matmul write the logits into the gradient buffer and the step
    overwrite them there: the same loss and gradient, bit for bit, as with a separate buffer."""
    logits, labels = _chunk(dtype)
    grad = torch.empty_like(logits)
    loss = step(logits, labels, grad)
    in_place = logits.clone()
    assert torch.equal(step(in_place, labels, in_place), loss) and torch.equal(in_place, grad)


def test_kernel_results_do_not_depend_on_the_thread_count():
    logits, labels = _chunk(torch.bfloat16, rows=257)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grad = torch.empty_like(logits)
            outs.append((cpu_fused.chunk_loss_and_grad(logits, labels, grad), grad))
    finally:
        torch.set_num_threads(threads)
    for loss, grad in outs[1:]:
        assert torch.equal(loss, outs[0][0]) and torch.equal(grad, outs[0][1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_give_a_non_finite_loss(bad):
    logits, labels = _chunk(torch.bfloat16)
    logits[3, 5] = bad
    loss = cpu_fused.chunk_loss_and_grad(logits, labels, torch.empty_like(logits))
    assert not torch.isfinite(loss)


def test_label_outside_the_vocabulary_is_refused_not_read():
    logits, labels = _chunk(torch.bfloat16, rows=8, vocab=50)
    labels[3] = 50
    with pytest.raises(ValueError, match="label 50 outside"):
        cpu_fused.chunk_loss_and_grad(logits, labels, None)


def test_wrong_gradient_buffer_is_refused():
    logits, labels = _chunk(torch.bfloat16)
    with pytest.raises(ValueError, match="grad_out"):
        cpu_fused.chunk_loss_and_grad(logits, labels, torch.empty(logits.shape))  # fp32 for bf16 logits


def test_switch_off_and_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SOURCELM_CACHE", str(tmp_path))
    build.library.cache_clear()
    try:
        assert build.available()
        built = list((tmp_path / "kernels").glob("sourcelm_kernels-*.so"))
        assert len(built) == 1  # compiled into the cache, no temporary left behind
        assert list((tmp_path / "kernels").iterdir()) == built
        build.library.cache_clear()
        assert build.available() and list((tmp_path / "kernels").iterdir()) == built  # reused
        monkeypatch.setenv("SOURCELM_NATIVE", "0")
        build.library.cache_clear()
        assert not build.available()
        assert ops.cross_entropy_chunk(torch.device("cpu")) is chunk_loss_and_grad
    finally:
        build.library.cache_clear()


# ------------------------------------------------------------------------------------------ RMSNorm

def _scale(t):
    return max(1.0, float(t.abs().max())) if t.numel() else 1.0


def _norm_run(fn, x, weight, dy):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = fn(x, weight, 1e-6)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 37, 96), (70, 256), (0, 64)])
def test_rms_norm_matches_the_torch_code(dtype, shape):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    weight = 1 + 0.2 * torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    ref, got = _norm_run(rms_norm, x, weight, dy), _norm_run(cpu_fused.rms_norm, x, weight, dy)
    assert [t.dtype for t in got] == [t.dtype for t in ref] == [torch.float32, dtype, torch.float32]
    if dtype == torch.float32:
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * _scale(b))
    else:  # the same fp32 values up to an ulp or two before each rounding to bf16
        y_ulp = 2 * torch.finfo(torch.bfloat16).eps * (ref[0].abs() + 1e-6)
        assert bool(((got[0] - ref[0]).abs() <= y_ulp).all())
        dx_ulp = 2 * torch.finfo(torch.bfloat16).eps * (ref[1].float().abs() + 1e-6)
        assert bool(((got[1].float() - ref[1].float()).abs() <= dx_ulp).all())
        torch.testing.assert_close(got[2], ref[2], rtol=1e-3, atol=1e-3 * _scale(ref[2]))


def test_rms_norm_weight_gradient_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(2)
    x, dy = torch.randn(1000, 256, generator=g), torch.randn(1000, 256, generator=g)
    weight = torch.ones(256)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            runs.append(_norm_run(cpu_fused.rms_norm, x, weight, dy))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_in_bf16_is_the_cast_of_its_fp32_output(dtype):
    """A norm that feeds bf16 matmuls writes bf16: the same values as its fp32 output cast (what autocast
    did before the matmul), and from a bf16 gradient the same dx and dw as from that gradient in fp32 (bits
    for a bf16 x; for an fp32 x the two kernels fuse multiply-adds differently: dx within an ulp)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(70, 256, generator=g) * 3).to(dtype)
    weight = 1 + 0.2 * torch.randn(256, generator=g)
    dy = torch.randn(70, 256, generator=g).to(torch.bfloat16)
    got = _norm_run(lambda a, w, eps: cpu_fused.rms_norm(a, w, eps, torch.bfloat16), x, weight, dy)
    ref = _norm_run(cpu_fused.rms_norm, x, weight, dy.float())
    assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], ref[0].to(torch.bfloat16))
    assert torch.equal(got[2], ref[2])
    if dtype == torch.bfloat16:
        assert torch.equal(got[1], ref[1])
    else:
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=2 * torch.finfo(torch.float32).eps * _scale(ref[1]))


def test_rms_norm_module_feeding_a_matmul_returns_the_autocast_dtype(monkeypatch):
    norm, plain = RMSNorm(64, feeds_matmul=True), RMSNorm(64)
    x = torch.randn(5, 64)
    assert norm(x).dtype == torch.float32  # no autocast: nothing to cast for
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_plain = norm(x), plain(x)
        monkeypatch.setenv("SOURCELM_KERNELS", "torch")
        y_torch = norm(x)
    assert y.dtype == y_torch.dtype == torch.bfloat16 and y_plain.dtype == torch.float32
    assert torch.equal(y, y_plain.to(torch.bfloat16))
    torch.testing.assert_close(y_torch, y, rtol=1e-2, atol=1e-2)  # the torch code: the same up to a bf16 ulp


def test_rms_norm_module_takes_the_kernel_on_the_cpu_only_for_an_fp32_weight():
    norm = RMSNorm(64)
    x = torch.randn(5, 64, requires_grad=True)
    assert type(norm(x).grad_fn).__name__ == "_RMSNormBackward"
    assert type(norm.double()(x.double()).grad_fn).__name__ != "_RMSNormBackward"  # fp64: the torch code


# ------------------------------------------------------------------------------- routed-expert rows

def _routing(seed=0, n=37, k=3, e=5, h=24):
    """A layout with absent slots (expert parallelism) and padded groups, tokens and slot weights."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, e, (n, k), generator=g)
    idx[torch.rand(n, k, generator=g) < 0.25] = -1
    return ops.group_by_expert(idx, e, align=4), torch.randn(n, h, generator=g), torch.rand(n, k, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_kernels_match_the_torch_dispatch_and_combine(dtype, monkeypatch):
    """Dispatch and combine, values and gradients, with the kernels and with the torch code: fp32 equal up
    to summation order; bf16 within one rounding (the kernels weight in fp32, torch in bf16)."""
    layout, x, w = _routing()

    def run():
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        rows = ops.dispatch_rows(xs, layout, dtype)
        y = rows * torch.linspace(0.5, 1.5, rows.shape[1], dtype=dtype)  # an "expert" that keeps rows apart
        out = ops.combine_rows(y, ws, layout)
        out.float().mul(torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return rows.detach(), out.detach(), xs.grad, ws.grad

    got = run()
    monkeypatch.setenv("SOURCELM_KERNELS", "torch")
    ref = run()
    assert torch.equal(got[0], ref[0])  # dispatch forward: a cast and a gather
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert bool((got[0][layout.copy_of_row == layout.n_tokens * layout.k] == 0).all())  # padding rows are zero


def test_row_kernels_against_a_plain_loop():
    """Each kernel on its own, sentinels included, against Python loops in fp64."""
    g = torch.Generator().manual_seed(1)
    src, grad = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)
    index = torch.tensor([0, 5, 6, -1, 2, 2, 3, 9])  # 6, -1 and 9 name the zero row
    w = torch.rand(12, generator=g)  # one per slot of src's 6 rows x 2
    row = lambda t, i: t[i].double() if 0 <= i < t.shape[0] else torch.zeros(t.shape[1], dtype=torch.float64)
    gathered = cpu_moe.gather_rows(src, index, 2, w, torch.float32)  # src rows of slots index // 2, weighted
    want = torch.stack([w[i] * row(src, i // 2) if 0 <= i < 12 else torch.zeros(8, dtype=torch.float64)
                        for i in index.tolist()])
    torch.testing.assert_close(gathered.double(), want)
    w = w[:8].contiguous()  # one per (token, j) of 4 tokens x 2
    summed = cpu_moe.sum_rows(src, index, 2, w, torch.float32)
    want = torch.stack([sum(w[t * 2 + j] * row(src, int(index[t * 2 + j])) for j in range(2)) for t in range(4)])
    torch.testing.assert_close(summed.double(), want)
    dots = cpu_moe.slot_dots(src, index, grad, 2)
    want = torch.stack([row(src, int(index[s])) @ grad[s // 2].double() for s in range(8)])
    torch.testing.assert_close(dots.double(), want)


def test_row_kernels_do_not_depend_on_the_thread_count():
    layout, x, w = _routing(seed=2, n=301)
    y = torch.randn(layout.copy_of_row.numel(), x.shape[1]).to(torch.bfloat16)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append((cpu_moe.sum_rows(y, layout.row_of_slot, layout.k, w.reshape(-1), torch.bfloat16),
                         cpu_moe.slot_dots(y, layout.row_of_slot, y[:x.shape[0]].contiguous(), layout.k)))
    finally:
        torch.set_num_threads(threads)
    for a, b in outs[1:]:
        assert torch.equal(a, outs[0][0]) and torch.equal(b, outs[0][1])


# ------------------------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_matches_the_torch_code(dtype):
    """The queries' rotary slice (a strided view of [B, T, heads, qk] transposed to heads-first) and the
    keys' ([B, T, d], shared by the heads): values and gradients against the torch code (`rotate_pairs`)."""
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    q = torch.randn(2, 7, 3, 24, generator=g).to(dtype)
    for x in (q.transpose(1, 2)[..., 8:], torch.randn(2, 7, 16, generator=g).to(dtype)):
        assert cpu_fused.rope_takes(x, cos, sin)
        got_x, ref_x = (x.detach().clone().requires_grad_() for _ in range(2))
        got, ref = apply_rope(got_x, cos, sin), rotate_pairs(ref_x, cos, sin)
        up = torch.randn(ref.shape, generator=g).to(dtype)
        got.backward(up)
        ref.backward(up)
        assert got.dtype == dtype and got.is_contiguous()
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_x.grad, ref_x.grad, rtol=1e-6, atol=1e-6)
        else:  # forward: the same fp32 value rounded once; backward: torch sums the two parts in bf16
            assert torch.equal(got, ref)
            torch.testing.assert_close(got_x.grad, ref_x.grad, rtol=1e-2, atol=1e-2)


def test_rope_kernel_declines_what_it_does_not_handle():
    x, cos = torch.randn(2, 7, 16), torch.randn(7, 8)
    assert cpu_fused.rope_takes(x, cos, cos)
    assert not cpu_fused.rope_takes(x, cos.requires_grad_(), cos)  # a learned angle would need its gradient
    assert not cpu_fused.rope_takes(x.double(), cos.detach(), cos.detach())
    # odd d
    assert not cpu_fused.rope_takes(x[..., ::2].contiguous()[..., :7], cos.detach()[:, :3], cos.detach()[:, :3])


# ------------------------------------------------------------------------------------------- SwiGLU

def _swiglu_run(fn, gu, dh):
    x = gu.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(dh)
    return y, x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_is_as_accurate_as_the_torch_code_against_fp64(dtype):
    """Values and the [gate | up] gradient, on gate values across silu's range (large negative and positive
    included): fp32 within a few ulps of fp64; bf16 rounds once, so within the torch code's own error."""
    g = torch.Generator().manual_seed(0)
    gu = torch.cat([torch.randn(3, 50, 64, generator=g) * 6, torch.randn(3, 50, 64, generator=g)], dim=-1)
    gu[0, 0, :8] = torch.tensor([-100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, -0.5])
    dh = torch.randn(3, 50, 64, generator=g)
    ref, ref_grad = _swiglu_run(reference.swiglu, gu.double(), dh.double())
    assert cpu_fused.swiglu_takes(gu.to(dtype))
    got, got_grad = _swiglu_run(cpu_fused.swiglu, gu.to(dtype), dh.to(dtype))
    assert got.dtype == got_grad.dtype == dtype and got_grad.shape == gu.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_grad.double(), ref_grad, rtol=1e-5, atol=1e-6)
        return
    tv, tg = _swiglu_run(reference.swiglu, gu.to(dtype), dh.to(dtype))
    for mine, theirs, exact in ((got, tv, ref), (got_grad, tg, ref_grad)):
        err_mine = (mine.double() - exact).abs().max()
        err_torch = (theirs.double() - exact).abs().max()
        assert err_mine <= err_torch


def test_swiglu_kernel_takes_rows_sliced_from_a_wider_tensor():
    """gu as the rows of a wider buffer (row stride > 2n) gives the values and gradient of its copy; a view
    whose rows are not evenly strided is declined (the torch code runs it)."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(40, 100, generator=g)
    gu, dh = wide[:, 10:74], torch.randn(40, 32, generator=g)
    assert not gu.is_contiguous() and cpu_fused.swiglu_takes(gu)
    got, got_grad = _swiglu_run(cpu_fused.swiglu, gu, dh)
    ref, ref_grad = _swiglu_run(cpu_fused.swiglu, gu.contiguous(), dh)
    assert torch.equal(got, ref) and torch.equal(got_grad, ref_grad)
    assert not cpu_fused.swiglu_takes(torch.randn(4, 6, 10)[:, ::2].transpose(0, 1))
    assert not cpu_fused.swiglu_takes(torch.randn(4, 7))
    assert not cpu_fused.swiglu_takes(torch.randn(4, 8).double())


def test_ffns_run_the_same_swiglu_with_and_without_the_kernel(monkeypatch):
    """The dense FFN and the routed experts through `ops.swiglu`: kernel and torch code agree
    in fp32 (values and every parameter's gradient)."""
    from sourcelm.model.moe import MLP

    torch.manual_seed(0)
    mlp, x = MLP(24, 40), torch.randn(2, 9, 24)
    w1, w2, w3 = torch.randn(3, 8, 24), torch.randn(3, 24, 8), torch.randn(3, 8, 24)
    rows, counts = torch.randn(10, 24), torch.tensor([4, 0, 6])

    def run():
        params = [*mlp.parameters(), *(w.detach().requires_grad_() for w in (w1, w2, w3))]
        for p in params:
            p.grad = None
        out = mlp(x).sum() + ops.expert_ffn(rows, counts, *params[3:]).square().sum()
        out.backward()
        return out.detach(), [p.grad.clone() for p in params]

    got = run()
    monkeypatch.setenv("SOURCELM_KERNELS", "torch")
    ref = run()
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    for a, b in zip(got[1], ref[1]):  # sums of products of O(10) values: fp32 rounding differs in the last bits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


# ------------------------------------------------------------------------------------------ routing

def _router(e, k, groups, keep, seed=0):
    cfg = dataclasses.replace(load_config("tiny").model, n_routed_experts=e, num_experts_per_tok=k, n_group=groups,
                              topk_group=keep)
    router = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    router.e_score_correction_bias.copy_(torch.randn(e, generator=g) * 0.1)
    return router, torch.rand(3001, e, generator=g)


@pytest.mark.parametrize("e,k,groups,keep", [(16, 4, 4, 2), (256, 8, 8, 4), (64, 6, 1, 1), (16, 4, 4, 4)])
def test_router_selection_kernel_equals_the_torch_code(e, k, groups, keep):
    """The same experts in the same order (best first) as the torch selection, DeepSeek-V3's shape included."""
    router, scores = _router(e, k, groups, keep)
    assert cpu_moe.route_takes(scores, groups, keep, k)
    got = cpu_moe.route_topk(scores, router.e_score_correction_bias, groups, router.per_group_top, keep, k)
    assert torch.equal(got, reference.route_topk(scores, router.e_score_correction_bias, router.n_group,
                                                 router.per_group_top, router.topk_group, router.top_k))


def test_router_selection_kernel_survives_nan_scores():
    router, scores = _router(16, 4, 4, 2)
    scores[0] = float("nan")
    scores[1, :5] = float("nan")
    got = cpu_moe.route_topk(scores, router.e_score_correction_bias, 4, 2, 2, 4)
    assert bool(((got >= 0) & (got < 16)).all())  # valid experts; the loss, NaN, stops the step anyway
    assert torch.equal(got[2:], reference.route_topk(scores[2:], router.e_score_correction_bias, router.n_group,
                                                     router.per_group_top, router.topk_group, router.top_k))
    assert bool((got[1, None] != torch.arange(5)[:, None]).all())  # a number beats a NaN


@pytest.mark.parametrize("align", [1, 4, 64])
def test_layout_kernel_equals_the_torch_code(align, monkeypatch):
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 7, (501, 3), generator=g)
    ids[torch.rand(501, 3, generator=g) < 0.2] = -1  # absent slots (expert parallelism)
    ids[:, 0] = 5  # one large group
    got = ops.group_by_expert(ids, 7, align)
    monkeypatch.setenv("SOURCELM_KERNELS", "torch")
    want = ops.group_by_expert(ids, 7, align)
    for name in ("counts", "copy_of_row", "row_of_slot"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.complete == want.complete is False


def test_layout_kernels_refuse_bad_ids_and_full_groups():
    with pytest.raises(ValueError, match="expert ids"):
        cpu_moe.expert_counts(torch.tensor([0, 3, 9]), 4)
    with pytest.raises(ValueError, match="expert id"):
        cpu_moe.slot_layout(torch.tensor([0, 3, 9]), torch.tensor([1, 0, 0, 1]), 2)
    with pytest.raises(ValueError, match="padded size"):  # two slots of expert 0 in a group of one row
        cpu_moe.slot_layout(torch.tensor([0, 0, 1]), torch.tensor([1, 1]), 2)
