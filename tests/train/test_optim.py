import pytest
import torch
from torch import nn

from sourcelm.kernels import build, cpu_adamw
from sourcelm.train.optim import FlatAdamW

needs_native = pytest.mark.skipif(not build.available(), reason="no C compiler: the native kernels do not build")


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [("w", nn.Parameter(torch.randn(5, 3, generator=g))), ("norm", nn.Parameter(torch.randn(3, generator=g))),
            ("emb", nn.Parameter(torch.randn(4, 2, generator=g)))]


def test_matches_torch_adamw_with_decay_on_matrices_only(update_path):
    ours, ref = make_params(), make_params()
    opt = FlatAdamW(ours, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    torch_opt = torch.optim.AdamW([{"params": [ref[0][1], ref[2][1]], "weight_decay": 0.1},
                                   {"params": [ref[1][1]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  foreach=False)
    g = torch.Generator().manual_seed(1)
    for _step in range(5):
        grads = [torch.randn(p.shape, generator=g) for _, p in ours]
        for (_, p), (_, q), gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step(lr=1e-2)
        torch_opt.step()
        for (_, p), (_, q) in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_state_round_trip_by_name_and_grad_scale(update_path):
    a, b = make_params(), make_params()
    opt_a = FlatAdamW(a)
    for _, p in a:
        p.grad = torch.ones_like(p)
    opt_a.step(lr=0.1)
    state = opt_a.state_dict()
    assert set(state) == {f"{n}.{k}" for n, _ in a for k in ("exp_avg", "exp_avg_sq")}
    assert state["w.exp_avg"].shape == (5, 3)
    opt_b = FlatAdamW(list(reversed(b)))  # a different parameter order loads the same state
    for (_, p), (_, q) in zip(a, b):
        q.data.copy_(p.data)
    opt_b.load_state_dict(state, step=opt_a.step_count)
    for (_, p), (_, q) in zip(a, b):
        p.grad = torch.full_like(p, 2.0)
        q.grad = torch.full_like(q, 4.0)
    opt_a.step(lr=0.1)
    opt_b.step(lr=0.1, grad_scale=0.5)  # clipping by 0.5 gives the same update as half the gradient
    for (_, p), (_, q) in zip(a, b):
        assert torch.equal(p, q)


def _backward(params):
    w, norm, emb = (p for _, p in params)
    ((w.sum(0) * norm).sum() + emb.square().sum()).backward()


def test_parameters_live_in_the_flat_buffer_and_gradients_are_read_where_backward_left_them(update_path):
    params = make_params()
    opt = FlatAdamW(params)
    w, norm, emb = (p for _, p in params)
    _backward(params)
    assert opt.flat_grad is None and w.grad.data_ptr() != opt.flat_param.data_ptr()
    expected = sum(float(p.grad.double().square().sum()) for _, p in params)
    assert abs(float(opt.grad_sq_sum()) - expected) < 1e-5 * expected
    before = opt.flat_param.clone()
    opt.step(lr=0.1)
    assert not torch.equal(before[:15], w.detach().reshape(-1))  # the step moved the parameter itself
    assert torch.equal(opt.flat_param[:15], w.detach().reshape(-1))
    opt.zero_grad()
    assert all(p.grad is None for _, p in params)


def test_folded_and_unfolded_gradients_give_the_same_bits(update_path):
    """A layout that reduces gradients over ranks folds them into the flat buffer (`fold_grads`) and the
    update reads that; a single process reads backward's own tensors. The same steps either way."""
    runs = []
    for fold in (False, True):
        params = make_params()
        opt = FlatAdamW(params)
        for _step in range(3):
            _backward(params)
            params[2][1].grad = params[2][1].grad.t().contiguous().t()  # a non-contiguous gradient, as set by hand
            if fold:
                flat = opt.fold_grads()
                assert all(p.grad is None for p in opt.params) and flat.data_ptr() == opt.flat_grad.data_ptr()
            norm = opt.grad_sq_sum()
            opt.step(lr=0.1, grad_scale=0.5)
            opt.zero_grad()
        runs.append((opt.flat_param.clone(), opt.exp_avg.clone(), norm))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_folding_micro_batches_sums_them_in_fp32(update_path):
    """Two micro-batches folded one after the other: the buffer holds their fp32 sum, a parameter without a
    gradient in either reads zero, and the step equals one on the summed gradients."""
    params, ref = make_params(), make_params()
    opt, opt_ref = FlatAdamW(params), FlatAdamW(ref)
    g = torch.Generator().manual_seed(2)
    total = [torch.zeros_like(p) for _, p in params]
    for _micro in range(2):
        for i, (_, p) in enumerate(params[:2]):  # "emb" gets no gradient
            p.grad = torch.randn(p.shape, generator=g)
            total[i] += p.grad
        opt.fold_grads()
    for (_, q), t in zip(ref, total):
        q.grad = t.clone()
    at = dict(zip(opt.names, opt._offsets))
    assert torch.equal(opt.flat_grad[at["norm"]:at["norm"] + 3], total[1])
    assert torch.equal(opt.flat_grad[at["emb"]:at["emb"] + 8], torch.zeros(8))
    opt.step(lr=0.1)
    opt_ref.step(lr=0.1)
    assert torch.equal(opt.flat_param, opt_ref.flat_param)
    opt.zero_grad()
    assert not opt._folded  # the next step reads backward's tensors again


@needs_native
def test_native_update_matches_fp64_and_torch_and_not_the_thread_count():
    """The AdamW kernel against the update in float64 and against torch's fused kernel, over blocks with
    short last chunks, decayed and not, clipped; the same bits on 1 and 2 threads."""
    g = torch.Generator().manual_seed(0)
    sizes, decayed = [130, 64, 1000, 7], [True, False, True, False]
    p0 = [torch.randn(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g) * 1e-2 for n in sizes]
    m0 = [torch.randn(n, generator=g) * 1e-3 for n in sizes]
    v0 = [torch.rand(n, generator=g) * 1e-4 for n in sizes]
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3, grad_mult=0.5)
    runs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            p, m, v = [t.clone() for t in p0], [t.clone() for t in m0], [t.clone() for t in v0]
            cpu_adamw.AdamWBlocks(p, m, v, [None] * 4, decayed).step(grads, **hyper)
        finally:
            torch.set_num_threads(before)
        runs.append(torch.cat(p + m + v))
    assert torch.equal(runs[0], runs[1])
    p = runs[0][:sum(sizes)].split(sizes)
    for i, d in enumerate(decayed):
        gg, mm, vv = grads[i].double() * 0.5, m0[i].double(), v0[i].double()
        mm = mm + 0.1 * (gg - mm)
        vv = 0.95 * vv + 0.05 * gg * gg
        want = p0[i].double() * (1 - 1e-2 * 0.1 * d) - 1e-2 / (1 - 0.9 ** 3) * mm / (
            vv.sqrt() / (1 - 0.95 ** 3) ** 0.5 + 1e-8)
        torch.testing.assert_close(p[i].double(), want, rtol=1e-6, atol=1e-7)
        q, mq, vq = p0[i].clone(), m0[i].clone(), v0[i].clone()
        torch._fused_adamw_([q], [grads[i].clone()], [mq], [vq], [], [torch.tensor(3.0)], lr=1e-2, beta1=0.9,
                            beta2=0.95, eps=1e-8, weight_decay=0.1 if d else 0.0, amsgrad=False, maximize=False,
                            grad_scale=torch.tensor(2.0))
        torch.testing.assert_close(p[i], q, rtol=1e-6, atol=1e-7)


@needs_native
def test_compute_copies_update_like_the_masters_would():
    """A copied parameter: its bf16 copy is a parameter of its own that starts as the master rounded; the
    update reads the copy's bf16 gradient (as the master's fp32 cast of it would give), then rewrites the
    copy from the new master. Vectors cannot be copied."""
    params, ref = make_params(), make_params()
    opt, opt_ref = FlatAdamW(params, copies=["w", "not-here"]), FlatAdamW(ref)
    (w_name, copy), = opt.copies.items()
    w = params[0][1]
    assert w_name == "w" and copy.dtype == torch.bfloat16 and copy.requires_grad
    assert torch.equal(copy, w.detach().bfloat16()) and opt.names[0] == "w"
    g = torch.Generator().manual_seed(5)
    for _step in range(3):
        grads = [torch.randn(p.shape, generator=g) for _, p in params]
        copy.grad = grads[0].bfloat16()
        params[1][1].grad, params[2][1].grad = grads[1], grads[2]
        for (_, q), gr in zip(ref, [grads[0].bfloat16().float(), grads[1], grads[2]]):
            q.grad = gr.clone()
        assert float(opt.grad_sq_sum()) == pytest.approx(float(opt_ref.grad_sq_sum()), rel=1e-6)
        opt.step(lr=0.1, grad_scale=0.7)
        opt_ref.step(lr=0.1, grad_scale=0.7)
        opt.zero_grad()
        opt_ref.zero_grad()
        assert copy.grad is None and torch.equal(opt.flat_param, opt_ref.flat_param)
        assert torch.equal(copy, w.detach().bfloat16())
    with pytest.raises(ValueError, match="vector"):
        FlatAdamW(make_params(), copies=["norm"])


def test_blocks_stay_inside_one_parameter_and_cover_the_slice():
    g = torch.Generator().manual_seed(0)
    sizes = [70_000, 3, 140_001, 5]
    params = [(f"p{i}", nn.Parameter(torch.randn(n, 1 if i % 2 else 2, generator=g))) for i, n in enumerate(sizes)]
    opt = FlatAdamW(params)
    covered = 0
    for _decayed, flat, moments, i, own in opt._blocks:
        o = opt._offsets[i]
        assert o <= flat.start and flat.stop <= o + opt.params[i].numel()
        assert (own.start, own.stop) == (flat.start - o, flat.stop - o) and moments == flat
        assert flat.start == covered and (flat.stop - flat.start) <= 1 << 16
        covered = flat.stop
    assert covered == opt.numel
