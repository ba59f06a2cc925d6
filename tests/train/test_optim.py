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


def test_parameters_and_gradients_live_in_the_flat_buffers():
    params = make_params()
    opt = FlatAdamW(params)
    w, norm, emb = (p for _, p in params)
    ((w.sum(0) * norm).sum() + emb.sum()).backward()  # autograd accumulates into the views, in place
    assert opt.flat_grad.abs().sum() > 0
    assert all(p.grad.data_ptr() == v.data_ptr() for p, v in zip(opt.params, opt._grad_views))
    torch.testing.assert_close(opt.flat_grad[:15].view(5, 3), norm.detach().expand(5, 3))
    before = opt.flat_param.clone()
    opt.step(lr=0.1)
    assert not torch.equal(before[:15], w.detach().reshape(-1))  # the step moved the parameter itself
    assert torch.equal(opt.flat_param[:15], w.detach().reshape(-1))
    opt.zero_grad()
    assert w.grad.abs().sum() == 0 and w.grad.data_ptr() == opt.flat_grad.data_ptr()
