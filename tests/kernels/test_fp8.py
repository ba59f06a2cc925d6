"""The FP8 recipe (`sourcelm.kernels.fp8`): tile and block scales against float64, E4M3's round-trip
bound, zero / outlier / inf / NaN tiles, the K-chunked emulated GEMM against float64, the FP8 linear's
three GEMMs against fp64 with worst-case bounds and against the fp32 and bf16 linears, what it saves for
backward, and `train.fp8` validation. The CUDA tests skip without an FP8 GPU.

The E4M3 bound used throughout: E4M3 keeps 3 mantissa bits, so a normal value v in [2^e, 2^(e+1)) lies
on a grid of step 2^(e-3) and rounding to nearest moves it by at most 2^(e-4) <= 2^-4 |v|. Below the
smallest normal 2^-6 the grid is the fixed subnormal step 2^-9, an error of at most 2^-10. In the scaled
domain v = x / s with s = amax / 448, so for every element |x - x_hat| <= max(2^-4 |x|, 2^-10 s), and
over a tile max |x - x_hat| <= 2^-4 amax (fp32's own roundings add a few 2^-24 relative, within SLACK).
"""

import pytest
import torch
import torch.nn.functional as F

from sourcelm.config import ConfigError
from sourcelm.kernels import fp8, reference
from sourcelm.kernels.fp8 import (
    E4M3,
    check_fp8_setting,
    dequantize_blocks,
    dequantize_tiles,
    emulated_mm,
    fp8_linear,
    quantize_blocks,
    quantize_operand,
    quantize_tiles,
)

REL = 2.0 ** -4       # E4M3's relative rounding bound for normals
SUB = 2.0 ** -10      # its absolute bound below the smallest normal, in units of the scale
SLACK = 1 + 2.0 ** -20  # fp32 division / multiplication roundings around the E4M3 rounding
U32 = 2.0 ** -24      # fp32 unit roundoff


def ranged(*shape, seed=0, spread=3.0):
    """Gaussian data whose rows span `spread` decades, so tiles get very different scales."""
    g = torch.Generator().manual_seed(seed)
    rows = shape[0] if len(shape) > 1 else 1
    magnitudes = torch.logspace(-spread / 2, spread / 2, rows)[torch.randperm(rows, generator=g)]
    return torch.randn(*shape, generator=g) * magnitudes.view(-1, *([1] * (len(shape) - 1)))


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest-even onto the E4M3 grid, in float64, independent of torch's cast."""
    _, exponent = torch.frexp(v.abs())  # |v| = m 2^E with m in [0.5, 1): binade e = E - 1
    step = 2.0 ** ((exponent - 1).clamp_min(-6) - 3).double()
    return torch.round(v / step) * step


def tile_reference(x: torch.Tensor, rows_per_block: int):
    """Float64 scales (amax of the real elements / 448) of each rows_per_block x 128 block of a 2-D x."""
    r, c = x.shape
    s = torch.empty(-(-r // rows_per_block), -(-c // 128), dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            block = x[i * rows_per_block:(i + 1) * rows_per_block, j * 128:(j + 1) * 128].double()
            s[i, j] = max(block.abs().max().item(), fp8.AMAX_FLOOR) / 448.0
    return s


def expand(s: torch.Tensor, rows_per_block: int, shape) -> torch.Tensor:
    return s.repeat_interleave(rows_per_block, 0).repeat_interleave(128, 1)[:shape[0], :shape[1]]


# ------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("rows_per_block,shape", [(1, (9, 300)), (128, (200, 300))])
def test_scales_and_values_match_a_float64_reference(rows_per_block, shape):
    x = ranged(*shape)
    q, s = quantize_tiles(x) if rows_per_block == 1 else quantize_blocks(x)
    assert q.dtype == E4M3 and q.shape == x.shape and s.dtype == torch.float32
    ref = tile_reference(x, rows_per_block)
    assert torch.equal(s, ref.float())  # the tail tile (44 columns) and the tail block (72 rows) included
    scaled = x / expand(s, rows_per_block, shape)  # the fp32 quotient the cast rounds
    assert torch.equal(q.double(), e4m3_round(scaled.double()))


@pytest.mark.parametrize("rows_per_block", [1, 128])
def test_round_trip_error_is_within_the_e4m3_bound(rows_per_block):
    x = ranged(256, 384, seed=1)
    if rows_per_block == 1:
        q, s = quantize_tiles(x)
        back = dequantize_tiles(q, s)
    else:
        q, s = quantize_blocks(x)
        back = dequantize_blocks(q, s)
    scale = expand(s, rows_per_block, x.shape)
    err = (back - x).abs()
    assert (err <= torch.maximum(REL * x.abs(), SUB * scale) * SLACK).all()
    amax = expand(tile_reference(x, rows_per_block), rows_per_block, x.shape).float() * 448
    assert (err <= REL * amax * SLACK).all()
    # the bound is nearly reached (a coarser format, e.g. E5M2's 2^-3, would fail the first assertion)
    normal = x.abs() >= 2.0 ** -6 * scale
    assert (err[normal] / x.abs()[normal]).max() > 0.9 * REL


def test_the_e4m3_table_gives_torchs_cast_for_every_bit_pattern():
    q = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).view(16, 16)
    got, want = fp8.e4m3_to_fp32(q), q.float()
    assert got.dtype == torch.float32 and got.shape == (16, 16)
    assert torch.equal(got.isnan(), want.isnan()) and int(want.isnan().sum()) == 2  # 0x7f, 0xff
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # the same bits, -0.0 and the NaNs too
    assert torch.equal(fp8.e4m3_to_fp32(q.t()).view(torch.int32), q.t().float().view(torch.int32))  # a view


def test_all_zero_tile_quantizes_to_zeros_without_nan():
    x = ranged(4, 256)
    x[1, 128:] = 0.0
    q, s = quantize_tiles(x)
    assert torch.isfinite(s).all() and s[1, 1] > 0
    back = dequantize_tiles(q, s)
    assert torch.equal(back[1, 128:], torch.zeros(128)) and torch.isfinite(back).all()


def test_one_huge_outlier_coarsens_only_its_own_tile():
    x = ranged(4, 384, seed=2, spread=0.0)
    q0, s0 = quantize_tiles(x)
    x[2, 130] = 1e6  # beyond E4M3's dynamic range (448 / 2^-9, about 2.3e5) over its O(1) neighbours
    q, s = quantize_tiles(x)
    assert s[2, 1] == pytest.approx(1e6 / 448, rel=1e-6)
    changed = torch.ones_like(s, dtype=torch.bool)
    changed[2, 1] = False
    assert torch.equal(s[changed], s0[changed])  # every other tile keeps its scale and values
    mask = torch.ones(4, 384, dtype=torch.bool)
    mask[2, 128:256] = False
    assert torch.equal(q.float()[mask], q0.float()[mask])
    back = dequantize_tiles(q, s)
    assert abs(back[2, 130].item() - 1e6) <= REL * 1e6
    tile_err = (back[2, 128:256] - x[2, 128:256]).abs()
    assert (tile_err <= torch.maximum(REL * x[2, 128:256].abs(), SUB * s[2, 1]) * SLACK).all()
    # neighbours below half the smallest subnormal (2^-10 s, about 2.2) flush to zero: that tile alone
    assert (back[2, 128:256] == 0).sum() > 100


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_inf_or_nan_input_makes_its_outputs_non_finite(bad):
    x, w = ranged(6, 256), ranged(64, 256, seed=3)
    x[3, 200] = bad
    y = fp8_linear(x, w)
    assert not torch.isfinite(y[3]).any()  # the whole row (its tile's scale is non-finite)
    assert torch.isfinite(y[[0, 1, 2, 4, 5]]).all()  # the other tokens' tiles are untouched
    w[5, 7] = bad
    assert not torch.isfinite(fp8_linear(ranged(6, 256), w)[:, 5]).any()
    # a non-finite upstream gradient reaches both gradients (the trainer skips and counts the step)
    xg, wg = ranged(6, 256).requires_grad_(), ranged(64, 256, seed=3).requires_grad_()
    g = torch.ones(6, 64)
    g[1, 9] = bad
    fp8_linear(xg, wg).backward(g)
    assert not torch.isfinite(xg.grad).all() and not torch.isfinite(wg.grad).all()


def test_a_damaged_scale_shape_is_refused():
    q, s = quantize_blocks(ranged(200, 300))
    with pytest.raises(ValueError, match=r"need.*\[2, 3\]"):
        dequantize_blocks(q, s[:, :2])


# ---------------------------------------------------------------------------------------------- GEMMs


@pytest.mark.parametrize("budget", [1 << 24, 3 * 64 * 48])  # one bmm for all chunks; three chunks at a time
def test_emulated_gemm_sums_k_in_fp32_chunks(budget, monkeypatch):
    """Against float64 on the same dequantized operands: each 128-chunk costs <= 128 roundings, adding
    the chunks <= their count, dequantizing each operand 1: |err| <= (128 + chunks + 2) u (|a| |b|ᵀ)."""
    monkeypatch.setattr(fp8, "PARTIALS_BUDGET", budget)
    a = quantize_operand(ranged(64, 1200, seed=4).abs(), 1)  # all positive: nothing cancels, errors add up
    b = quantize_operand(ranged(48, 1200, seed=5).abs(), 128)
    got = emulated_mm(a, b)
    da, db = fp8.dequantize_operand(a)[:64].double(), fp8.dequantize_operand(b)[:48].double()
    ref = da @ db.T
    chunks = 1200 // 128 + 1
    assert ((got.double() - ref).abs() <= (128 + chunks + 2) * U32 * ref).all()
    # measured about 5 u: far from a partial sum kept at the tensor core's ~14 bits (2^-14 = 1024 u)
    assert ((got.double() - ref).abs() / ref).max() < 16 * U32


def worst_case(a_err: float, b_err: float) -> float:
    """Relative bound on sum_k a_k b_k when a and b carry relative errors a_err and b_err: with all
    elements normal, |a_hat b_hat - a b| <= ((1 + a_err)(1 + b_err) - 1) |a||b| term by term."""
    return (1 + a_err) * (1 + b_err) - 1


@pytest.mark.parametrize("shape", [(3, 37, 200), (2, 64, 256)])  # 200: a partial tail tile and block
def test_fp8_linear_three_gemms_within_their_worst_case_bounds(shape):
    """Magnitudes in [0.5, 2] keep every element normal after scaling, so each operand's error is
    within 2^-4 relative; x enters Wgrad quantized twice (1x128, then 128x1): (1 + 2^-4)^2 - 1."""
    g = torch.Generator().manual_seed(6)
    *lead, k = shape
    n = 80

    def data(*s):
        return (torch.rand(*s, generator=g) * 1.5 + 0.5) * (torch.randint(0, 2, s, generator=g) * 2 - 1)

    x, w, gy = data(*shape).requires_grad_(), data(n, k).requires_grad_(), data(*lead, n)
    y = fp8_linear(x, w)
    y.backward(gy)
    x64, w64, g64 = x.detach().double(), w.detach().double(), gy.double()
    fp32 = 200 * U32  # the fp32 GEMM itself
    assert ((y.double() - x64 @ w64.T).abs() <= (worst_case(REL, REL) + fp32) * (x64.abs() @ w64.abs().T)).all()
    assert ((x.grad.double() - g64 @ w64).abs() <= (worst_case(REL, REL) + fp32) * (g64.abs() @ w64.abs())).all()
    g2, x2 = g64.reshape(-1, n), x64.reshape(-1, k)
    bound = (worst_case(REL, worst_case(REL, REL)) + fp32) * (g2.abs().T @ x2.abs())
    assert ((w.grad.double() - g2.T @ x2).abs() <= bound).all()


def test_fp8_linear_against_the_fp32_and_bf16_linears():
    """Gaussian data (subnormals and cancellation included). Measured: FP8's normwise error is about
    0.037 (forward, Dgrad) and 0.045 (Wgrad, x quantized twice), some 13x BF16's 0.0029; bounded at 0.05
    / 0.06, and at least 5x BF16's so a silently-BF16 path would fail."""
    x, w, gy = ranged(512, 256, seed=7, spread=0.0), ranged(384, 256, seed=8, spread=0.0) * 0.05, ranged(512, 384)
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(xf, wf).backward(gy)
    x8, w8 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y8 = fp8_linear(x8, w8)
    y8.backward(gy)

    def rel(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    ref = F.linear(x, w)
    bf16 = rel(F.linear(x.bfloat16(), w.bfloat16()), ref)
    assert 5 * bf16 < rel(y8, ref) < 0.05
    assert rel(x8.grad, xf.grad) < 0.05 and rel(w8.grad, wf.grad) < 0.06


def test_dtypes_follow_the_input_and_the_weight():
    x = ranged(2, 5, 128).bfloat16().requires_grad_()
    for w in (ranged(64, 128).requires_grad_(), ranged(64, 128).bfloat16().requires_grad_()):
        y = fp8_linear(x, w)
        y.float().sum().backward()
        assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 64)
        assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == w.dtype
        x.grad = None


def test_the_output_dtype_is_f_linears_under_autocast():
    """An FP32 input (the residual stream after RMSNorm) under BF16 autocast gives a BF16 output, as F.linear's, so
    what follows the GEMM computes and saves in BF16 as with FP8 off; the input gradient stays FP32, x's dtype.
    Without autocast the output has x's dtype."""
    x, w = ranged(2, 5, 128).requires_grad_(), ranged(64, 128).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ref = fp8_linear(x, w), F.linear(x, w)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert fp8_linear(x, w).dtype == torch.float32


def test_backward_keeps_the_fp8_activation_not_the_input():
    x, w = ranged(300, 200).bfloat16().requires_grad_(), ranged(64, 200).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp8_linear(x, w)
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(E4M3, (300, 256)), (torch.float32, (300, 2)),
                                                         (torch.float32, (64, 200))]
    assert saved[2].data_ptr() == w.data_ptr()  # the resident weight, no copy
    fp8_bytes = sum(t.numel() * t.element_size() for t in saved[:2])
    assert fp8_bytes < 0.7 * x.numel() * x.element_size()  # (256 + 8) / (200 * 2) of the bf16 input


def test_a_weight_made_for_the_call_is_kept_as_its_fp8_blocks():
    """A weight stacked from two parameters (q_a with kv_a, gate with up) is a fresh tensor: backward keeps its
    E4M3 blocks and scales, not its FP32 elements; the gradients are the same bits as through a resident weight.
    A parameter, or a view of a tensor that outlives the call (an expert's slice), is kept as it is."""
    x = ranged(300, 200).bfloat16()
    a, b = ranged(40, 200).requires_grad_(), (ranged(24, 200) * 0.5).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8_linear(x.requires_grad_(), torch.cat([a, b]))
    assert [(t.dtype, tuple(t.shape)) for t in saved[2:]] == [(E4M3, (128, 256)), (torch.float32, (1, 2))]
    y.float().square().sum().backward()
    stacked = torch.cat([a, b]).detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    fp8_linear(x2, stacked).float().square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(torch.cat([a.grad, b.grad]), stacked.grad)
    # a slice of a tensor that outlives the call (one expert of the stacked experts) is kept as it is: no FP8 copy
    experts = torch.stack([a.detach(), a.detach() * 0.5]).requires_grad_()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp8_linear(x, experts[1])
    assert len(saved) == 3 and saved[2].untyped_storage().data_ptr() == experts.untyped_storage().data_ptr()


def test_the_swiglu_and_down_projection_keep_the_swiglus_input_in_fp8():
    """`fp8_swiglu_linear`: the forward is fp8_linear on swiglu(gu), bit for bit; backward keeps gu's E4M3 tiles
    (nothing of the SwiGLU's output) and recomputes the SwiGLU from them: the input gradient is the SwiGLU's
    backward at the FP8-rounded gu times FP8Linear's Dgrad, the weight gradient the FP8 Wgrad of the recomputed
    output, both bit for bit; and both stay within FP8's error of the fp32 composition."""
    gu, w, dy = ranged(300, 192, seed=3, spread=0.0), ranged(80, 96, seed=4, spread=0.0) * 0.1, ranged(300, 80)
    gu8, w8 = gu.clone().requires_grad_(), w.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8.fp8_swiglu_linear(gu8, w8, reference.swiglu)
    assert torch.equal(y, fp8_linear(reference.swiglu(gu), w))
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(E4M3, (300, 256)), (torch.float32, (300, 2)),
                                                         (torch.float32, (80, 96))]
    y.backward(dy)

    gu_hat = dequantize_tiles(*quantize_tiles(gu)).requires_grad_()
    h_hat = reference.swiglu(gu_hat)
    probe = torch.zeros(300, 96, requires_grad=True)  # FP8Linear's Dgrad does not read its input
    fp8_linear(probe, w).backward(dy)
    assert torch.equal(gu8.grad, torch.autograd.grad(h_hat, gu_hat, probe.grad)[0])
    assert torch.equal(w8.grad, fp8._wgrad(fp8._transposed_tiles(h_hat.detach(), "emulate"), dy, torch.float32,
                                           "emulate"))

    gu32, w32 = gu.clone().requires_grad_(), w.clone().requires_grad_()
    F.linear(reference.swiglu(gu32), w32).backward(dy)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(gu8.grad, gu32.grad) < 0.06 and rel(w8.grad, w32.grad) < 0.06  # measured 0.047, 0.049 (unfused 0.037)
    with pytest.raises(ValueError, match=r"swiglu\(gu\) has 96 input features"):
        fp8.fp8_swiglu_linear(gu, ranged(80, 128), reference.swiglu)
    with pytest.raises(ValueError, match="two equal halves"):
        fp8.fp8_swiglu_linear(gu[:, :191], w, reference.swiglu)


def test_no_tokens():
    x, w = torch.zeros(0, 96, requires_grad=True), ranged(40, 96).requires_grad_()
    y = fp8_linear(x, w)
    y.sum().backward()
    assert y.shape == (0, 40) and torch.equal(w.grad, torch.zeros(40, 96)) and x.grad.shape == (0, 96)


# ------------------------------------------------------------------------------------------ the setting


def test_check_fp8_setting_names_the_field_and_the_value_that_works(monkeypatch):
    assert check_fp8_setting("off", "cpu").startswith("off")
    assert check_fp8_setting("emulate", "cpu").startswith("emulate")
    with pytest.raises(ConfigError, match=r"train\.fp8 = 'fp8'.*'off', 'emulate', 'cuda'"):
        check_fp8_setting("fp8", "cpu")
    with pytest.raises(ConfigError, match=r"train\.fp8 = 'cuda' needs a CUDA device.*train\.fp8 = 'emulate'"):
        check_fp8_setting("cuda", "cpu")
    with pytest.raises(ConfigError, match=r"train\.fp8 = 'emulate' on CUDA .*flash.*set train\.dtype = 'bfloat16'"):
        check_fp8_setting("emulate", "cuda", "float32")
    assert check_fp8_setting("emulate", "cpu", "float32").startswith("emulate")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # an A100: CUDA, but no FP8 tensor cores
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"A100 has compute capability 8\.0.*>= 8\.9.*train\.fp8 = 'emulate'"):
        check_fp8_setting("cuda", "cuda")


def test_unknown_backend_and_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="'emulate' or 'cuda'"):
        fp8_linear(ranged(2, 128), ranged(8, 128), "off")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        fp8_linear(ranged(2, 128), ranged(8, 128), "cuda")
    with pytest.raises(ValueError, match="96 input features"):
        fp8_linear(ranged(2, 96), ranged(8, 128))


# -------------------------------------------------------------------------------------------------- CUDA


def test_cuda_path_layouts_pass_torchs_own_checks():
    """On meta tensors torch's blockwise scaled_mm runs only its shape and stride checks: the three GEMMs
    of the CUDA path (Fprop 1x128 x 128x128, Dgrad the same with the blocks transposed, Wgrad 1x128 x
    1x128) hand it operands and scale layouts it accepts, and the outputs come back at the real sizes.
    (A scale in the wrong layout is refused, so this fails on a layout mistake; numerics need a GPU.)"""
    x = torch.randn(3, 37, 200, device="meta", requires_grad=True)
    w = torch.randn(80, 200, device="meta", requires_grad=True)
    y = fp8.FP8Linear.apply(x.bfloat16(), w, "cuda", torch.bfloat16, True)
    assert y.shape == (3, 37, 80) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and w.grad.dtype == torch.float32
    a = quantize_operand(torch.randn(256, 384, device="meta"), 1, 128)
    b = quantize_operand(torch.randn(384, 384, device="meta"), 128, 128)
    with pytest.raises(RuntimeError, match="stride"):  # the 1x128 scales row-major instead of outer-dim-major
        F.scaled_mm(a.q, b.q.t(), a.scale, F.ScalingType.BlockWise1x128, b.scale, F.ScalingType.BlockWise128x128)


def fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= fp8.MIN_FP8_CAPABILITY


needs_fp8_gpu = pytest.mark.skipif(not fp8_gpu(), reason="needs a CUDA GPU with FP8 tensor cores (cc >= 8.9)")


@needs_fp8_gpu
def test_cuda_setting_probes_blockwise_scaled_mm():
    problem = fp8.blockwise_scaled_mm_problem(torch.device("cuda", torch.cuda.current_device()))
    if problem:
        with pytest.raises(ConfigError, match="emulate"):
            check_fp8_setting("cuda", "cuda")
        pytest.skip(problem)
    assert check_fp8_setting("cuda", "cuda").startswith("cuda: torch blockwise scaled_mm")


@needs_fp8_gpu
@pytest.mark.parametrize("op", ["linear", "swiglu_linear"])
@pytest.mark.parametrize("shape,n", [((4, 96, 256), 384), ((300, 200), 80)])
def test_cuda_backend_matches_the_emulation(shape, n, op):
    if fp8.blockwise_scaled_mm_problem(torch.device("cuda", torch.cuda.current_device())):
        pytest.skip("torch's blockwise scaled_mm does not run on this GPU")
    in_features = shape[-1] if op == "linear" else shape[-1] // 2  # the SwiGLU halves [gate | up]
    x, w, gy = ranged(*shape).cuda(), ranged(n, in_features, seed=9).cuda(), ranged(*shape[:-1], n).cuda()
    results = {}
    for backend in ("emulate", "cuda"):
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = (fp8_linear(xb.bfloat16(), wb, backend) if op == "linear"
             else fp8.fp8_swiglu_linear(xb.bfloat16(), wb, reference.swiglu, backend))
        y.float().backward(gy.bfloat16().float())
        results[backend] = (y.float(), xb.grad, wb.grad)
    for got, want in zip(results["cuda"], results["emulate"]):
        assert ((got - want).norm() / want.norm()).item() < 1e-2  # the same FP8 operands; bf16 outputs
