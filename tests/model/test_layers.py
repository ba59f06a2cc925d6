"""Fast paths against their plain references: sdpa and bmm vs eager MLA, grouped vs loop experts, the router
against transformers' router, and the balance loss against a direct evaluation of report eq. 17-20."""

import dataclasses

import pytest
import torch

from sourcelm.config import load_config
from sourcelm.kernels import expert_matmul, ops
from sourcelm.model import build_model
from sourcelm.model.attention import MLA
from sourcelm.model.init import init_weights
from sourcelm.model.moe import MoE, sequence_balance_loss

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny(**over):
    cfg = load_config("tiny").model
    return dataclasses.replace(cfg, **over)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("over", [{}, {"q_lora_rank": None}, {"rope_scaling": YARN, "max_position_embeddings": 512}])
def test_sdpa_and_bmm_match_eager(over):
    torch.manual_seed(0)
    cfg = tiny(**over)
    attn = MLA(cfg)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.05)
    from sourcelm.model.norm_rope import RotaryEmbedding

    cos, sin = RotaryEmbedding(cfg)(torch.arange(40), torch.float32)
    x = torch.randn(3, 40, cfg.hidden_size)
    outs, grads = [], []
    impls = ("eager", "sdpa", "bmm")
    for impl in impls:
        attn.impl = impl
        attn.zero_grad()
        y = attn(x, cos, sin)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append(_grads(attn))
    for i in (1, 2):
        torch.testing.assert_close(outs[i], outs[0], rtol=1e-5, atol=1e-6)
        for k in grads[0]:
            torch.testing.assert_close(grads[i][k], grads[0][k], rtol=1e-4, atol=1e-6)


def test_bmm_attention_in_bf16_is_as_close_to_fp64_as_flash():
    """bmm rounds the scores to bf16 before the softmax, flash keeps them in fp32: both stay at bf16's level."""
    from sourcelm.kernels.attention import bmm_causal, sdpa_causal

    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 96, 48, generator=g) for _ in range(2))
    v, grad_out = (torch.randn(2, 4, 96, 32, generator=g) for _ in range(2))
    scale = 48 ** -0.5

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, scale)
        out.backward(grad_out.to(dtype))
        return [out.detach().double()] + [t.grad.double() for t in leaves]

    truth = run(sdpa_causal, torch.float64)
    flash, bmm = run(sdpa_causal, torch.bfloat16), run(bmm_causal, torch.bfloat16)
    for t, f, b in zip(truth, flash, bmm):
        err_flash, err_bmm = float((f - t).norm() / t.norm()), float((b - t).norm() / t.norm())
        assert err_bmm < 0.01 and err_bmm < 3 * err_flash


def test_auto_attention_picks_a_materialised_softmax_for_short_cpu_sequences_only():
    from sourcelm.kernels import amx
    from sourcelm.kernels.ops import BMM_SCORES_BUDGET, choose_attention

    def qkv(b, heads, t, dtype=torch.bfloat16):  # CPU tensors of those shapes without the memory
        q = torch.zeros(1, 1, 1, 1, dtype=dtype).expand(b, heads, t, 48)
        return q, q, q[..., :32]

    short = "amx" if amx.ready() else "bmm"  # the AMX kernel where it runs, bf16 only
    assert choose_attention(*qkv(8, 4, 256)) == short and choose_attention(*qkv(8, 4, 256, torch.float32)) == "bmm"
    t = int((BMM_SCORES_BUDGET // (8 * 4 * 2)) ** 0.5)  # the longest sequence whose scores fit the budget
    assert t % 32 == 0 and choose_attention(*qkv(8, 4, t)) == short and choose_attention(*qkv(8, 4, t + 1)) == "sdpa"
    assert choose_attention(*qkv(8, 4, t - 8)) == "bmm"  # not a multiple of the kernel's 32-row blocks
    meta = torch.zeros(1, 1, 1, 1, device="meta").expand(8, 4, 256, 48)
    assert choose_attention(meta, meta, meta[..., :32]) == "sdpa"  # not the CPU


def test_yarn_frequencies_and_scale_match_reference_numbers():
    # report §1.6: dim 64, base 1e4, orig 4096, factor 40 -> ramp over [10, 23], softmax x (0.1 ln 40 + 1)^2
    from sourcelm.model.norm_rope import rope_frequencies, softmax_scale

    cfg = dataclasses.replace(load_config("deepseek-v3-671b").model)
    inv, attention_factor = rope_frequencies(cfg)
    base = 1.0 / (1e4 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    torch.testing.assert_close(inv[:10], base[:10])
    torch.testing.assert_close(inv[23:], base[23:] / 40)
    assert attention_factor == 1.0
    assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * 1.3688879454113936 ** 2)


def _moe(cfg, seed=0):
    torch.manual_seed(seed)
    layer = MoE(cfg)
    for _name, p in layer.named_parameters():
        torch.nn.init.normal_(p, std=0.05)
    layer.gate.e_score_correction_bias.uniform_(-0.05, 0.1)
    return layer


def _moe_values_and_grads(dtype, impl):
    layer = _moe(tiny()).to(dtype)
    layer.experts.impl = impl
    x = torch.randn(4, 33, layer.gate.weight.shape[1], generator=torch.Generator().manual_seed(5))
    x = x.to(torch.bfloat16).to(dtype).requires_grad_()  # the same inputs in every dtype
    y, counts, _ = layer(x)
    (y.double() * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
    return y.detach().double(), counts, {**{k: g.double() for k, g in _grads(layer).items()}, "x": x.grad.double()}


def test_grouped_experts_match_loop_forward_and_backward():
    """fp32: the grouped path (gathers, grouped matmuls; the native row kernels on the CPU) equals the
    per-expert loop up to rounding, values and every gradient."""
    (y, counts, grads), (ref_y, ref_counts, ref_grads) = (_moe_values_and_grads(torch.float32, impl)
                                                          for impl in ("grouped", "loop"))
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    assert torch.equal(counts, ref_counts)
    for k, ref in ref_grads.items():  # rounding relative to the gradient's scale (the router's reaches ~10)
        torch.testing.assert_close(grads[k], ref, rtol=1e-5, atol=1e-6 * max(1.0, float(ref.abs().max())))


def test_grouped_experts_in_bf16_are_as_accurate_as_the_loop():
    """bf16: the two paths round differently (the grouped one weights and sums in fp32), so each is held
    to the fp64 loop: the grouped path's error, values and every gradient, at most the bf16 loop's."""
    truth_y, truth_counts, truth = _moe_values_and_grads(torch.float64, "loop")

    def errors(impl):
        y, counts, grads = _moe_values_and_grads(torch.bfloat16, impl)
        assert torch.equal(counts, truth_counts)
        return {"y": float((y - truth_y).norm() / truth_y.norm()),
                **{k: float((g - truth[k]).norm() / truth[k].norm()) for k, g in grads.items()}}

    grouped, loop = errors("grouped"), errors("loop")
    for k, err in grouped.items():
        assert err < 0.02 and err <= 1.05 * loop[k], (k, err, loop[k])


def test_expert_ffn_fallback_matches_grouped_mm(monkeypatch):
    torch.manual_seed(1)
    e, i, h = 5, 8, 12
    w1, w3, w2 = torch.randn(e, i, h), torch.randn(e, i, h), torch.randn(e, h, i)
    counts = torch.tensor([3, 0, 7, 1, 0])
    x = torch.randn(int(counts.sum()), h)
    ref = torch.cat([torch.nn.functional.silu(r @ w1[j].T) * (r @ w3[j].T) @ w2[j].T
                     for j, r in enumerate(x.split(counts.tolist()))])
    torch.testing.assert_close(ops.expert_ffn(x, counts, w1, w2, w3), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setitem(expert_matmul._GROUPED_MM_OK, ("cpu", torch.float32), False)
    torch.testing.assert_close(ops.expert_ffn(x, counts, w1, w2, w3), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("align,idle_expert", [(1, False), (4, False), (32, False), (32, True), (1, True)])
def test_grouped_dispatch_and_combine_match_plain_autograd(align, idle_expert):
    """Layout with absent slots (-1, as under expert parallelism) and padded groups, uneven or (align 32,
    above every group's size) equal, when the experts run as one bmm; with an expert no slot chose, over
    the others only: values and gradients of x, the weights and the experts equal a per-slot loop
    differentiated by autograd (float64)."""
    g = torch.Generator().manual_seed(3)
    n, k, e, h, i = 9, 3, 4, 6, 5
    x = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    w1, w3 = (torch.randn(e, i, h, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w2 = torch.randn(e, h, i, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, e, (n, k), generator=g)
    idx[torch.rand(n, k, generator=g) < 0.3] = -1
    idx[:, 0] = 2  # one expert gets a group of 9+ rows (uneven groups), token 0..n-1 all route to it
    if idle_expert:  # as a collapsed router leaves them: expert 1 gets no slot (an empty group, its gradient 0)
        idx[idx == 1] = 3
    layout = ops.group_by_expert(idx, e, align)
    assert layout.counts.sum() == layout.copy_of_row.numel() and bool((layout.counts % align == 0).all())
    used = layout.counts[layout.counts > 0]
    assert bool((used == used[0]).all()) == (align == 32)
    assert (int(layout.counts[1]) == 0) == idle_expert
    out = ops.combine_rows(ops.expert_ffn(ops.dispatch_rows(x, layout, x.dtype), layout.counts, w1, w2, w3), w, layout)
    ref = torch.zeros(n, h, dtype=torch.float64)
    for t in range(n):
        for s in range(k):
            j = int(idx[t, s])
            if j >= 0:
                ref = ref + torch.nn.functional.one_hot(torch.tensor(t), n).double()[:, None] * (
                    w[t, s] * (torch.nn.functional.silu(x[t] @ w1[j].T) * (x[t] @ w3[j].T)) @ w2[j].T)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    up = torch.randn(n, h, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, w, w1, w2, w3), up)
    want = torch.autograd.grad(ref, (x, w, w1, w2, w3), up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (8, 2)])
def test_router_matches_transformers(n_group, topk_group):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = tiny(n_group=n_group, topk_group=topk_group, num_experts_per_tok=2 * topk_group)
    layer = _moe(cfg)
    hf_cfg = DeepseekV3Config(hidden_size=cfg.hidden_size, n_routed_experts=16, num_experts_per_tok=2 * topk_group,
                              n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5)
    hf = DeepseekV3TopkRouter(hf_cfg)
    hf.load_state_dict(layer.gate.state_dict())
    x = torch.randn(300, cfg.hidden_size)
    idx, w, _ = layer.gate(x)
    _, hf_w, hf_idx = hf(x)
    order, hf_order = idx.sort(-1), hf_idx.sort(-1)
    assert torch.equal(order.values, hf_order.values)
    torch.testing.assert_close(w.gather(1, order.indices), hf_w.gather(1, hf_order.indices))


def test_router_group_limit_and_bias_only_select():
    cfg = tiny()  # 16 experts in 4 groups, keep 2 groups, top 4
    layer = _moe(cfg)
    x = torch.randn(500, cfg.hidden_size)
    idx, w, s = layer.gate(x)
    groups = (idx // 4).tolist()
    assert all(len(set(g)) <= 2 for g in groups)
    # weights are the unbiased sigmoid scores of the chosen experts, normalised, times 2.5
    expect = s.gather(1, idx)
    torch.testing.assert_close(w, expect / expect.sum(-1, keepdim=True) * 2.5)
    # a large bias on expert 5 forces its selection without changing its (unbiased) weight formula
    layer.gate.e_score_correction_bias.zero_()
    layer.gate.e_score_correction_bias[5] = 10.0
    idx2, _, _ = layer.gate(x)
    assert (idx2 == 5).any(-1).all()


def test_counts_and_balance_loss_follow_eq_17_to_20():
    cfg = tiny()
    layer = _moe(cfg)
    b, t, k, e = 3, 20, cfg.num_experts_per_tok, cfg.n_routed_experts
    x = torch.randn(b, t, cfg.hidden_size)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 15:] = False
    _, counts, bal = layer(x, mask, balance_alpha=1e-4)
    idx, _, s = layer.gate(x.reshape(-1, cfg.hidden_size))
    idx, s = idx.view(b, t, k), s.view(b, t, e)
    expect_counts = torch.zeros(e, dtype=torch.long)
    total = 0.0
    for bi in range(b):
        valid = [ti for ti in range(t) if mask[bi, ti]]
        f = torch.zeros(e)
        for ti in valid:
            for j in idx[bi, ti].tolist():
                f[j] += 1
                expect_counts[j] += 1
        f *= e / (k * len(valid))
        p = torch.stack([s[bi, ti] / s[bi, ti].sum() for ti in valid]).mean(0)
        total += float((f * p).sum().detach())
    assert torch.equal(counts, expect_counts)
    assert counts.sum() == mask.sum() * k
    assert bal.item() == pytest.approx(1e-4 * total / b, rel=1e-5)
    assert sequence_balance_loss(s, idx, e, k, None).requires_grad


def test_bias_stays_fp32_in_bf16_model():
    model = build_model(tiny(), seed=0).to(torch.bfloat16)
    for _, moe in model.moe_layers():
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, 8192, (2, 16))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    init_weights(model, 0)  # re-initialising a bf16 model works too


def test_autocast_keeps_router_fp32_and_runs_experts_in_bf16():
    cfg = tiny()
    layer = _moe(cfg)
    x = torch.randn(2, 12, cfg.hidden_size)
    ref_idx, _, _ = layer.gate(x.reshape(-1, cfg.hidden_size))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, w, s = layer.gate(x.reshape(-1, cfg.hidden_size))
        y, _, _ = layer(x)
    assert s.dtype == torch.float32 and torch.equal(idx, ref_idx)
    y.float().pow(2).sum().backward()
    assert layer.experts.w1.grad is not None and layer.experts.w1.grad.dtype == torch.float32
