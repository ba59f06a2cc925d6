"""AdamW moments kept in bf16 (`FlatAdamW(state_dtype=torch.bfloat16)`, as DeepSeek-V3 trains): they really are
bf16, the update stays close to the fp32-moment one, both update paths agree, and a run stopped, checkpointed and
resumed equals the straight run bit for bit."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sourcelm.kernels import build
from sourcelm.train.optim import FlatAdamW


def make_params(seed=0):
    # 70k + 130 elements: more than one 64k block, chunks with a short tail, decayed and not
    g = torch.Generator().manual_seed(seed)
    return [("w", nn.Parameter(torch.randn(350, 200, generator=g) * 0.05)),
            ("norm", nn.Parameter(1 + 0.1 * torch.randn(130, generator=g)))]


def grads_at(step, params):
    """A gradient that depends on the weights (so diverging weights show) and on the step."""
    g = torch.Generator().manual_seed(1000 + step)
    return [p.detach() * 0.3 + torch.randn(p.shape, generator=g) * 1e-2 for _, p in params]


def train(params, opt, steps, start=0):
    for step in range(start, start + steps):
        for (_, p), gr in zip(params, grads_at(step, params)):
            p.grad = gr
        opt.step(lr=1e-2 * (1 + step % 3), grad_scale=0.7 if step % 2 else 1.0)
        opt.zero_grad()


def test_moments_are_bf16_and_the_update_stays_close_to_fp32(update_path):
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        params = make_params()
        opt = FlatAdamW(params, state_dtype=dtype)
        train(params, opt, 20)
        runs[dtype] = (torch.cat([p.detach().reshape(-1) for _, p in params]), opt)
    opt16 = runs[torch.bfloat16][1]
    assert opt16.exp_avg.dtype == opt16.exp_avg_sq.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in opt16.state_dict().values())
    assert opt16.memory_bytes() == runs[torch.float32][1].memory_bytes() // 2
    start = torch.cat([p.detach().reshape(-1) for _, p in make_params()])
    moved32, moved16 = runs[torch.float32][0] - start, runs[torch.bfloat16][0] - start
    assert not torch.equal(moved16, moved32)  # the rounding of the moments really happened
    # 20 steps of lr ~2e-2 move each weight ~0.3; bf16 moments (8-bit mantissa) change that by well under 1 %
    assert (moved16 - moved32).norm() < 1e-2 * moved32.norm()
    # and the moments are the fp32 ones to a few bf16 roundings (elementwise, m near its zero crossings is all noise)
    fp32_state = runs[torch.float32][1].state_dict()
    for name, t in opt16.state_dict().items():
        assert (t.float() - fp32_state[name]).norm() < 2e-2 * fp32_state[name].norm(), name


def test_native_and_torch_paths_agree_to_one_bf16_rounding(monkeypatch):
    """The two kernels' fp32 updates differ by an ulp now and then; rounded to bf16 that is at most one bf16 ulp."""
    if not build.available():
        pytest.skip("no C compiler: the native kernels do not build")
    results = []
    for kernels in ("auto", "torch"):
        monkeypatch.setenv("SOURCELM_KERNELS", kernels)
        params = make_params()
        opt = FlatAdamW(params, state_dtype=torch.bfloat16)
        assert opt.native == (kernels == "auto")
        train(params, opt, 1)
        results.append((torch.cat([p.detach().reshape(-1) for _, p in params]), opt.exp_avg, opt.exp_avg_sq))
    (p_native, *moments_native), (p_torch, *moments_torch) = results
    torch.testing.assert_close(p_native, p_torch, rtol=1e-5, atol=1e-7)
    for a, b in zip(moments_native, moments_torch):
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=0)


def test_resume_from_a_checkpoint_is_bit_identical_with_bf16_moments(update_path, tmp_path):
    n, k = 12, 5
    straight = make_params()
    opt = FlatAdamW(straight, state_dtype=torch.bfloat16)
    train(straight, opt, n)

    first = make_params()
    opt_first = FlatAdamW(first, state_dtype=torch.bfloat16)
    train(first, opt_first, k)
    save_file({name: p.detach().contiguous() for name, p in first}, tmp_path / "model.safetensors")
    save_file(opt_first.state_dict(), tmp_path / "optimizer.safetensors")

    resumed = make_params(seed=7)  # other weights: everything must come from the checkpoint
    weights = load_file(tmp_path / "model.safetensors")
    for name, p in resumed:
        p.data.copy_(weights[name])
    opt_resumed = FlatAdamW(resumed, state_dtype=torch.bfloat16)
    opt_resumed.load_state_dict(load_file(tmp_path / "optimizer.safetensors"), step=k)
    train(resumed, opt_resumed, n - k, start=k)

    for (_, a), (_, b) in zip(straight, resumed):
        assert torch.equal(a, b)
    assert torch.equal(opt.exp_avg, opt_resumed.exp_avg) and torch.equal(opt.exp_avg_sq, opt_resumed.exp_avg_sq)


def test_an_unsupported_moment_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="state_dtype"):
        FlatAdamW(make_params(), state_dtype=torch.float16)


def test_trainer_with_bf16_moments_resumes_bit_identically(small_config, digest, tmp_path):
    """optim.state_dtype = bfloat16 through the whole trainer: the moments are bf16 in memory and in the checkpoint,
    and k steps + resume + the rest equal the straight run bit for bit."""
    from sourcelm.train import checkpoint as ckpt
    from sourcelm.train.loop import Trainer

    cfg = small_config("optim.state_dtype=bfloat16")
    ref = Trainer(cfg, tmp_path / "straight", progress=False)
    ref.fit()
    assert ref.dense_opt.exp_avg.dtype == ref.expert_opt.exp_avg_sq.dtype == torch.bfloat16
    first = Trainer(cfg, tmp_path / "split", progress=False)
    first.fit(stop_after=4)
    _, optim_state, _ = ckpt.load_checkpoint(ckpt.newest_valid_checkpoint(tmp_path / "split" / "checkpoints"))
    assert {t.dtype for t in optim_state.values()} == {torch.bfloat16}
    second = Trainer(cfg, tmp_path / "split", progress=False)
    assert second.resume()
    second.fit()
    assert digest(second.model) == digest(ref.model)
