import torch
from torch import nn

from sourcelm.train.optim import FlatAdamW


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [("w", nn.Parameter(torch.randn(5, 3, generator=g))), ("norm", nn.Parameter(torch.randn(3, generator=g))),
            ("emb", nn.Parameter(torch.randn(4, 2, generator=g)))]


def test_matches_torch_adamw_with_decay_on_matrices_only():
    ours, ref = make_params(), make_params()
    opt = FlatAdamW(ours, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    torch_opt = torch.optim.AdamW([{"params": [ref[0][1], ref[2][1]], "weight_decay": 0.1},
                                   {"params": [ref[1][1]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                  foreach=False)
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=g) for _, p in ours]
        for (_, p), (_, q), gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt.step(lr=1e-2)
        torch_opt.step()
        for (_, p), (_, q) in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_state_round_trip_by_name_and_grad_scale():
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


def test_parameters_live_in_the_flat_buffer_and_gradients_are_read_where_backward_left_them():
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


def test_synced_and_unsynced_gradients_give_the_same_bits():
    """A layout that reduces gradients over ranks copies them into the flat buffer (`sync_grads`) and the
    update reads that; a single process reads backward's own tensors. The same steps either way."""
    runs = []
    for sync in (False, True):
        params = make_params()
        opt = FlatAdamW(params)
        for step in range(3):
            _backward(params)
            params[2][1].grad = params[2][1].grad.t().contiguous().t()  # a non-contiguous gradient, as set by hand
            if sync:
                flat = opt.sync_grads()
                assert all(p.grad.data_ptr() == flat[o:].data_ptr() for p, o in zip(opt.params, opt._offsets))
            norm = opt.grad_sq_sum()
            opt.step(lr=0.1, grad_scale=0.5)
            opt.zero_grad()
        runs.append((opt.flat_param.clone(), opt.exp_avg.clone(), norm))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_blocks_stay_inside_one_parameter_and_cover_the_slice():
    g = torch.Generator().manual_seed(0)
    sizes = [70_000, 3, 140_001, 5]
    params = [(f"p{i}", nn.Parameter(torch.randn(n, 1 if i % 2 else 2, generator=g))) for i, n in enumerate(sizes)]
    opt = FlatAdamW(params)
    covered = 0
    for decayed, flat, moments, i, own in opt._blocks:
        o = opt._offsets[i]
        assert o <= flat.start and flat.stop <= o + opt.params[i].numel()
        assert (own.start, own.stop) == (flat.start - o, flat.stop - o) and moments == flat
        assert flat.start == covered and (flat.stop - flat.start) <= 1 << 16
        covered = flat.stop
    assert covered == opt.numel
