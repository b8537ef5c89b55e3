"""Quantization kernels: Triton (TRITON_INTERPRET=1 on CPU) bit for bit against the torch
reference on small odd shapes; round-trip error bounds per bit width; NaN/Inf survive."""

import math
import os

import pytest
import torch

# The interpreter is chosen when the kernels are decorated: set it before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from memfit.kernels import dispatch, reference as R

try:
    from memfit.kernels.triton import quant as T
except Exception as e:  # noqa: BLE001
    T = None
    _why = f"Triton unavailable: {e}"
else:
    _why = ""

needs_triton = pytest.mark.skipif(T is None or (not torch.cuda.is_available()
                                                 and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason=_why or "CPU without TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(7,), (3, 5, 7), (2, 3, 5, 11)]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit patterns, except that any NaN matches any NaN (torch's own float->bf16 NaN
    bits differ between its scalar and vector paths)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        na, nb = torch.isnan(a), torch.isnan(b)
        if not torch.equal(na, nb):
            return False
        ia = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
        return torch.equal(a.view(ia)[~na], b.view(ia)[~nb])
    return torch.equal(a, b)


def _sample(shape, dtype, special=True):
    g = torch.Generator().manual_seed(hash((shape, str(dtype))) % 2**31)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    if special and x.numel() > 6:
        flat = x.view(-1)
        flat[1], flat[-2], flat[x.numel() // 2] = math.nan, math.inf, -math.inf
    return x


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_triton_matches_reference_row_ranges(shape, bits, dtype, stochastic):
    x = _sample(shape, dtype)
    G = 16
    ref = R.quantize(x, bits, G, stochastic=stochastic, seed=11)
    tri = T.quantize(x, bits, G, stochastic=stochastic, seed=11)
    for a, b in zip(ref, tri):
        assert _bits_equal(a, b)
    ya = R.dequantize(*ref, x.shape, dtype, bits, G)
    yb = T.dequantize(*ref, x.shape, dtype, bits, G)
    assert _bits_equal(ya, yb)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_triton_matches_reference_headwise(bits, dtype, stochastic):
    B, H, Tn, D = 2, 3, 5, 7  # head-wise: channel of element i is (i // (T*D)) % H
    x = _sample((B, H, Tn, D), dtype)
    lo, hi = R.channel_minmax(x, Tn * D, H)
    s, z = R.scale_zero(lo, hi, (1 << bits) - 1)
    ref = R.quantize(x, bits, 8, scale=s, zero=z, ch_div=Tn * D, stochastic=stochastic, seed=5)
    tri = T.quantize(x, bits, 8, scale=s, zero=z, ch_div=Tn * D, stochastic=stochastic, seed=5)
    for a, b in zip(ref, tri):
        assert _bits_equal(a, b)
    kw = dict(ch_div=Tn * D, per_row=False)
    assert _bits_equal(R.dequantize(*ref, x.shape, dtype, bits, 8, **kw),
                       T.dequantize(*ref, x.shape, dtype, bits, 8, **kw))


@needs_triton
def test_dispatch_forced_triton_equals_reference():
    x = _sample((5, 33), torch.float32)
    with dispatch.force_backend("triton"):
        assert dispatch._impl(x) is T
        a = dispatch.quantize(x, 4, 32)
    with dispatch.force_backend("reference"):
        b = dispatch.quantize(x, 4, 32)
    assert all(_bits_equal(u, v) for u, v in zip(a, b))


def test_dispatch_picks_reference_on_cpu_and_for_fakes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    assert dispatch._impl(torch.zeros(3)) is R
    with FakeTensorMode():
        f = torch.zeros(4, 8)
        with dispatch.force_backend("triton"):
            assert dispatch._impl(f) is R
    with pytest.raises(ValueError):
        with dispatch.force_backend("cuda"):
            pass


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trip_error_bound(bits, dtype):
    G = 32
    x = _sample((9, 37), dtype, special=False)
    packed = R.quantize(x, bits, G)
    y = R.dequantize(*packed, x.shape, dtype, bits, G)
    xf = x.float().reshape(-1)
    pad = (-xf.numel()) % G
    rows = torch.cat([xf, xf[-1:].expand(pad)]).view(-1, G)
    rng = (rows.amax(1) - rows.amin(1))
    err = (y.float() - x.float()).reshape(-1)
    err = torch.cat([err, err.new_zeros(pad)]).view(-1, G).abs().amax(1)
    # Half a step of the row's range, plus the output dtype's own rounding.
    eps = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    bound = rng / ((1 << bits) - 1) / 2 * (1 + 1e-4) + eps * rows.abs().amax(1) + 1e-6
    assert (err <= bound).all(), (err - bound).max()
    # and the bound is not vacuous: the error is of the order of the step
    assert err.max() > 0.05 * (rng / ((1 << bits) - 1)).max()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_stochastic_rounding_is_unbiased_and_seeded(bits):
    x = torch.rand(64, 256) * 0.37 + torch.linspace(0, 1, 256)
    G = 256
    n = 200
    acc = torch.zeros_like(x)
    for s in range(n):
        acc += R.dequantize(*R.quantize(x, bits, G, stochastic=True, seed=s), x.shape, x.dtype, bits, G)
    nearest = R.dequantize(*R.quantize(x, bits, G), x.shape, x.dtype, bits, G)
    step = (1.37 / ((1 << bits) - 1))
    bias_sr = (acc / n - x).mean().abs().item()
    assert bias_sr < 0.02 * step
    # same seed, same codes; different seeds differ
    a = R.quantize(x, bits, G, stochastic=True, seed=3)[0]
    assert torch.equal(a, R.quantize(x, bits, G, stochastic=True, seed=3)[0])
    assert not torch.equal(a, R.quantize(x, bits, G, stochastic=True, seed=4)[0])
    assert (nearest - x).abs().max() <= step / 2 * 1.01
    g = torch.Generator().manual_seed(1)
    s1 = R.draw_seed(g)
    g.manual_seed(1)
    assert R.draw_seed(g) == s1


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_inf_survive(bits, dtype):
    x = _sample((4, 50), dtype)
    y = R.dequantize(*R.quantize(x, bits, 16), x.shape, dtype, bits, 16)
    assert torch.equal(torch.isnan(y), torch.isnan(x))
    assert torch.equal(y == math.inf, x == math.inf)
    assert torch.equal(y == -math.inf, x == -math.inf)
    # channel ranges too
    lo, hi = R.channel_minmax(x, 50, 4)
    s, z = R.scale_zero(lo, hi, (1 << bits) - 1)
    y2 = R.dequantize(*R.quantize(x, bits, 16, scale=s, zero=z, ch_div=50), x.shape, dtype, bits, 16,
                      ch_div=50, per_row=False)
    assert torch.equal(torch.isnan(y2), torch.isnan(x)) and torch.equal(y2.isinf(), x.isinf())


def test_packed_sizes_and_bad_args():
    for bits in (8, 4, 2):
        codes, flags, s, z = R.quantize(torch.randn(1000), bits, 64)
        assert codes.dtype == torch.uint8 and codes.numel() == 16 * 64 * bits // 8
        assert flags.numel() == 16 and s.numel() == 16
        assert R.packed_bytes(1000, bits, 64) == codes.numel() + flags.numel() + 8 * 16
    with pytest.raises(ValueError):
        R.quantize(torch.randn(10), 3, 64)
    with pytest.raises(ValueError):
        R.quantize(torch.randn(10), 8, 48)
    with pytest.raises(TypeError):
        R.quantize(torch.arange(10), 8, 64)
