"""The attention core and o_proj under FP8 (`fp8_attention`): the E5M6 format against a float64 reference over all
its codes, its tiles, and the fused op that keeps the core's output once in E5M6 for both backward passes."""

import pytest
import torch

from sourcelm.kernels import fp8, fp8_comm
from sourcelm.kernels import fp8_attention as fa
from sourcelm.kernels.attention import sdpa_causal

# every finite E5M6 value: the float16 bit patterns whose last four bits are zero, below the inf/NaN exponent
_CODES = torch.arange(0x7C0, dtype=torch.int32)
GRID = (_CODES << 4).to(torch.int16).view(torch.float16).double()


def _nearest_reference(v: torch.Tensor) -> torch.Tensor:
    """float64: each |v| to the nearest grid value, a tie to the one with the even code (even mantissa)."""
    a = v.double().abs()
    hi = torch.searchsorted(GRID, a).clamp(max=GRID.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - GRID[lo], GRID[hi] - a
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    return GRID[pick] * v.double().sign()


def test_e5m6_rounding_matches_the_float64_reference():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20000, generator=g) * torch.logspace(-7, 4.8, 20000)  # subnormals up to the top binade
    v = torch.cat([v, GRID[1:].float(), ((GRID[1:] + GRID[:-1]) / 2).float()])  # the grid and every midpoint
    v = v[v.abs() <= fa.E5M6_MAX]
    assert torch.equal(fa.round_to_e5m6(v).double(), _nearest_reference(v))
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])
    got = fa.round_to_e5m6(special)
    assert got[:4].tolist() == [0.0, 0.0, float("inf"), float("-inf")] and got[4].isnan()


def test_every_e5m6_code_packs_and_unpacks():
    """All 2 × 1984 finite values (both signs) through the 12-bit packing, in 1×128 tiles whose scale is 1."""
    values = torch.cat([GRID, -GRID]).float()
    values = torch.cat([values, torch.zeros(-values.numel() % 256)]).view(-1, 256)
    values[:, 0] = 32768.0  # a tile's amax in [2^15, 65024] gives scale 1: the codes are stored as they are
    values[:, 128] = 32768.0
    packed, scale = fa.quantize_e5m6(values)
    assert packed.dtype == torch.uint8 and packed.shape == (values.shape[0], 384)  # 1.5 bytes an element
    assert bool((scale == 1).all())
    assert torch.equal(fa.dequantize_e5m6(packed, scale, 256), values)


def test_e5m6_tiles_scale_by_powers_of_two():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 200, generator=g) * torch.logspace(-8, 6, 5)[:, None]
    x[3, :128] = 0
    x[4, 130] = float("nan")
    packed, scale = fa.quantize_e5m6(x)
    back = fa.dequantize_e5m6(packed, scale, 200)
    finite = scale.isfinite()
    assert bool((torch.frexp(scale[finite])[0] == 0.5).all())
    assert torch.equal(back[3, :128], torch.zeros(128))
    assert bool(back[4, 128:].isnan().all()) and bool(back[4, :128].isfinite().all())
    ok = torch.ones_like(x, dtype=torch.bool)
    ok[4, 128:] = False
    rel = ((back - x).abs() / x.abs().clamp_min(1e-30))[ok & (x != 0)]
    assert rel.max() <= 2 ** -7  # half of E5M6's 2^-6 step: the tiles' amax never leaves the normal range here
    # a power-of-2 tile converts to another power-of-2 scale exactly: halving a tile keeps its codes
    assert torch.equal(fa.dequantize_e5m6(*fa.quantize_e5m6(back[:4] / 2), 200) * 2, back[:4])


def _inputs(seed=0, b=2, heads=3, t=40, d=24, dv=16, out=64):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, heads, t, d, generator=g) for _ in range(2))
    v = torch.randn(b, heads, t, dv, generator=g)
    w = torch.randn(out, heads * dv, generator=g) * 0.1
    return q, k, v, w


def test_forward_is_the_core_then_the_fp8_linear():
    q, k, v, w = _inputs()
    y = fa.fp8_attention_output(q, k, v, 0.3, w)
    b, heads, t, dv = v.shape
    o = sdpa_causal(q, k, v, 0.3).transpose(1, 2).reshape(b, t, heads * dv)
    assert torch.equal(y, fp8.fp8_linear(o, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = fa.fp8_attention_output(q, k, v, 0.3, w)
    assert y16.dtype == torch.bfloat16


def test_backward_reads_the_output_from_its_e5m6_tiles():
    """The gradients are the flash backward's given dO = the FP8 Dgrad and O as its E5M6 tiles hold it, bit for bit;
    o_proj's weight gradient is the FP8 Wgrad on that same Ô."""
    q, k, v, w = [x.requires_grad_() for x in _inputs()]
    b, heads, t, dv = v.shape
    y = fa.fp8_attention_output(q, k, v, 0.3, w)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    dq, dk, dv_, dw = torch.autograd.grad(y, (q, k, v, w), grad_y)

    vp = torch.nn.functional.pad(v.detach(), (0, 8))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q.detach(), k.detach(), vp, 0.0, True,
                                                                           scale=0.3)
    o2 = out[..., :dv].transpose(1, 2).reshape(b * t, heads * dv)
    o_hat = fa.dequantize_e5m6(*fa.quantize_e5m6(o2), heads * dv)
    assert not torch.equal(o_hat, o2)  # E5M6 rounded it
    g2 = grad_y.reshape(-1, w.shape[0])
    d_o = fp8._dgrad(g2, fp8.quantize_operand(w.detach(), fp8.TILE), heads * dv, "emulate", torch.float32)

    def heads_first(x2):
        return torch.nn.functional.pad(x2.view(b, t, heads, dv).transpose(1, 2), (0, 8))

    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        heads_first(d_o), q.detach(), k.detach(), vp, heads_first(o_hat), lse, 0.0, True, scale=0.3)
    assert torch.equal(dq, want[0]) and torch.equal(dk, want[1]) and torch.equal(dv_, want[2][..., :dv])
    assert torch.equal(dw, fp8._wgrad(fp8._transposed_tiles(o_hat, "emulate"), g2, torch.float32, "emulate"))


def test_e5m6_keeps_the_attention_backward_closer_than_e4m3_would():
    """Why the report keeps this activation in E5M6: the core's backward given O rounded to E5M6 lands far closer to
    the exact gradients than given O in E4M3 tiles (the o_proj's usual cache)."""
    q, k, v, _ = _inputs(seed=2)
    b, heads, t, dv = v.shape
    vp = torch.nn.functional.pad(v, (0, 8))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, vp, 0.0, True, scale=0.3)
    d_out = torch.nn.functional.pad(torch.randn(b, heads, t, dv, generator=torch.Generator().manual_seed(3)), (0, 8))
    o2 = out.reshape(-1, out.shape[-1])

    def grads(o_given):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            d_out, q, k, vp, o_given.view(out.shape), lse, 0.0, True, scale=0.3)

    exact = grads(o2)
    e5m6 = grads(fa.dequantize_e5m6(*fa.quantize_e5m6(o2), o2.shape[1]))
    e4m3 = grads(fp8_comm.round_input(o2))

    def err(got):
        return max(((g - e).norm() / e.norm()).item() for g, e in zip(got[:2], exact[:2]))

    assert err(e5m6) < 0.005 and err(e4m3) > 4 * err(e5m6), (err(e5m6), err(e4m3))  # measured 0.0034, 0.024


def test_the_output_is_kept_once_in_e5m6():
    """What backward keeps: q, k, v, the softmax statistics, O's packed E5M6 codes and scales; no copy of O in the
    compute dtype, against the unfused FP8 path's BF16 O (the core's) and E4M3 O (o_proj's)."""
    q, k, v, w = [x.requires_grad_() for x in _inputs(heads=2, t=64, d=192, dv=128, out=96)]
    saved = []

    def run(fn):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn()
        params = {id(p) for p in (q, k, v, w)}
        return {t.data_ptr(): t for t in saved if id(t) not in params}

    fused = run(lambda: fa.fp8_attention_output(q, k, v, 0.3, w))
    tokens, o_elems = 2 * 64, 2 * 64 * 2 * 128
    bf16, fp32, u8 = torch.bfloat16, torch.float32, torch.uint8
    assert sorted((str(t.dtype), tuple(t.shape)) for t in fused.values()) == sorted(
        [(str(bf16), tuple(q.shape)), (str(bf16), tuple(k.shape)), (str(bf16), tuple(v.shape)),
         (str(fp32), (2, 2, 64)), (str(u8), (tokens, 384)), (str(fp32), (tokens, 2))])

    def unfused():
        o = sdpa_causal(q, k, v, 0.3).transpose(1, 2).reshape(2, 64, 256)
        return fp8.fp8_linear(o, w)

    plain = run(unfused)
    nbytes = lambda ts: sum(t.untyped_storage().nbytes() for t in ts.values())  # noqa: E731
    assert nbytes(fused) < nbytes(plain) - o_elems  # at least O's E4M3 copy less, and the BF16 O's padding


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_FP8_CAPABILITY),
                    reason="needs a CUDA GPU with FP8 tensor cores (cc >= 8.9)")
@pytest.mark.parametrize("backend", ["emulate", "cuda"])
def test_cuda_matches_the_cpu(backend):
    """CUDA's flash attention and backward (ATen's CUDA ops) with O read from E5M6, against the CPU's; bf16."""
    if backend == "cuda" and fp8.blockwise_scaled_mm_problem(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("torch's blockwise scaled_mm does not run on this GPU")
    inputs = _inputs(heads=2, t=64, d=192, dv=128, out=96)
    grad_y = torch.randn(2, 64, 96, generator=torch.Generator().manual_seed(4))
    results = {}
    for device, which in (("cpu", "emulate"), ("cuda", backend)):
        q, k, v, w = [x.to(device).requires_grad_() for x in inputs]
        with torch.autocast(device, dtype=torch.bfloat16):
            y = fa.fp8_attention_output(q, k, v, 0.3, w, which)
        results[device] = [y.float().cpu()] + [g.float().cpu() for g in torch.autograd.grad(
            y, (q, k, v, w), grad_y.to(device, torch.bfloat16))]
    for got, want in zip(results["cuda"], results["cpu"]):
        assert ((got - want).norm() / want.norm()).item() < 2e-2
