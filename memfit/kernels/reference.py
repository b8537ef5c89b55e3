"""Pure-torch reference of the activation quantization kernels (8, 4 and 2 bits).

The format (shared bit for bit with the Triton kernels in `memfit.kernels.triton.quant`):

- x (any shape, fp32/fp16/bf16) is read in its contiguous flat order: N elements, cut into
  M = ceil(N / G) rows of G = `group_size` elements (the last row padded with code 0).
- `codes`: uint8 (M, G * bits / 8). Element k of a row sits in byte k // P at bit offset
  (k % P) * bits, with P = 8 // bits codes per byte (little end first).
- `flags`: uint8 (M,), 1 where the row holds a NaN or an Inf.
- `scale`, `zero`: float32. Per row ("row" ranges: min/max of the row's finite values,
  computed by the quantize kernel), or per channel ("channel" ranges given by the caller:
  head-wise ranges, running EMA ranges), where flat element i belongs to channel
  (i // ch_div) % n_ch. Head-wise for a contiguous (B, H, T, D) tensor: ch_div = T * D,
  n_ch = H (Mesa, Pan et al. 2021).
- Quantize: v = (x - zero) / scale; q = floor(v + r) clamped to [0, qf]; r = 0.5, or a
  uniform draw in [0, 1) for stochastic rounding (unbiased: E[q] = v, as in ActNN, Chen et
  al. 2021). qf = 2^bits - 1, or 2^bits - 4 in a flagged row, whose top three codes mark
  NaN, +Inf and -Inf: non-finite values come back exactly where they were, so AMP's
  GradScaler still sees the overflow.
- Dequantize: y = q * scale + zero in float32, rounded once to the output dtype.

Random numbers for stochastic rounding come from a counter-based hash of (seed, flat
index) (Wellons' "lowbias32" integer hash), computed in 32-bit integer arithmetic, so the
torch reference and the Triton kernel draw exactly the same numbers. The seed is an
explicit argument (draw it from a `torch.Generator` with `draw_seed`).
"""

from __future__ import annotations

import math

import torch

BITS = (2, 4, 8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1  # seeds are spread over the 32-bit space before hashing


def check_args(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if group_size < 8 or group_size & (group_size - 1) or group_size > 65536:
        raise ValueError(f"group_size must be a power of two in [8, 65536], got {group_size}")


def n_rows(numel: int, group_size: int) -> int:
    return max(1, -(-numel // group_size))


def packed_bytes(numel: int, bits: int, group_size: int, n_channels: int | None = None) -> int:
    """Bytes of codes + flags + scale/zero for `numel` elements (n_channels: channel ranges)."""
    m = n_rows(numel, group_size)
    ranges = 8 * (m if n_channels is None else n_channels)
    return m * group_size * bits // 8 + m + ranges


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 31-bit seed for stochastic rounding from `generator` (the default one if None)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())


def hash_uniform(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform float32 in [0, 1) (multiples of 2^-24) from int64 flat indices and a seed."""
    h = (idx + (seed * _GOLDEN)) & _M32
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & _M32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (2.0 ** -24)


def _finite(x: torch.Tensor) -> torch.Tensor:
    return x.abs() < math.inf  # False for NaN and +-Inf


def channel_minmax(x: torch.Tensor, ch_div: int, n_ch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of the finite values per channel ((i // ch_div) % n_ch), float32 (n_ch,).

    A channel with no finite value gets (+inf, -inf).
    """
    xf = x.detach().reshape(-1, n_ch, ch_div).float()
    fin = _finite(xf)
    lo = torch.where(fin, xf, math.inf).amin(dim=(0, 2))
    hi = torch.where(fin, xf, -math.inf).amax(dim=(0, 2))
    return lo, hi


def scale_zero(lo: torch.Tensor, hi: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scale and zero point from ranges; empty or constant ranges get scale 1."""
    lo = lo.float()
    hi = hi.float()
    ok = hi > lo
    zero = torch.where(lo <= hi, lo, torch.zeros_like(lo))  # no finite value: zero 0
    zero = torch.where(_finite(zero), zero, torch.zeros_like(zero))
    scale = torch.where(ok, (hi - lo) / qmax, torch.ones_like(lo))
    scale = torch.where(_finite(scale) & (scale > 0), scale, torch.ones_like(scale))
    return scale, zero


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _per_channel(flat: torch.Tensor, vals: torch.Tensor, ch_div: int):
    """(flat, vals[channel of each element]) broadcastable pair, channel = (i // ch_div) % C.

    Uses a (-1, C, ch_div) view when the sizes allow it (no index tensor), else a gather.
    """
    C = vals.numel()
    N = flat.numel()
    if N % (C * ch_div) == 0:
        return flat.view(-1, C, ch_div), vals.view(1, C, 1)
    ch = (torch.arange(N, device=flat.device) // ch_div) % C
    return flat, vals[ch]


def quantize(x: torch.Tensor, bits: int = 8, group_size: int = 256, *, scale: torch.Tensor | None = None,
             zero: torch.Tensor | None = None, ch_div: int = 1, stochastic: bool = False,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `x` (see the module doc). Returns (codes, flags, scale, zero).

    Without `scale`/`zero` the ranges are per row, computed here; with them (float32, one per
    channel) element i uses channel (i // ch_div) % len(scale).
    """
    check_args(bits, group_size)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize takes float32, float16 or bfloat16, got {x.dtype}")
    G = group_size
    qmax = (1 << bits) - 1
    N = x.numel()
    M = n_rows(N, G)
    flat = x.detach().reshape(-1).float()
    pad = M * G - N
    xf = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    xf = xf.view(M, G)
    valid = (torch.arange(M * G, device=x.device) < N).view(M, G) if pad else None
    fin = _finite(xf)
    flags = (~fin).any(dim=1)          # padding is 0.0: finite
    # Tensors without NaN/Inf skip the special-value work. FakeTensors (the cost model's
    # simulation) cannot tell, and take the common path: predictions count the memory of a
    # finite tensor; with NaN/Inf present the real step also holds a few mask temporaries.
    special = not _is_fake(x) and bool(flags.any())
    qf = torch.where(flags, qmax - 3, qmax).to(torch.float32)            # (M,)
    if scale is None:
        use = fin & valid if valid is not None else fin
        lo = torch.where(use, xf, math.inf).amin(dim=1)
        hi = torch.where(use, xf, -math.inf).amax(dim=1)
        ok = hi > lo
        zero = torch.where(lo <= hi, lo, torch.zeros_like(lo))
        scale = torch.where(ok, (hi - lo) / torch.clamp(qf, min=1.0), torch.ones_like(lo))
        v = (xf - zero[:, None]).div_(scale[:, None])
    else:
        if zero is None:
            raise ValueError("zero must be given with scale")
        scale = scale.float()
        zero = zero.float()
        a, z_el = _per_channel(flat, zero, ch_div)
        _, s_el = _per_channel(flat, scale, ch_div)
        v = (a - z_el).div_(s_el).reshape(-1)
        v = (torch.cat([v, v.new_zeros(pad)]) if pad else v).view(M, G)
    # In place from here on: the same operations in the same order (bit-exact with the
    # kernel), without a full-size temporary per step (they raised the forward peak).
    if stochastic:
        v.add_(hash_uniform(torch.arange(M * G, device=x.device, dtype=torch.int64), seed).view(M, G))
    else:
        v.add_(0.5)
    v.floor_().clamp_(min=0.0)
    torch.minimum(v, qf[:, None], out=v)
    if special:
        v.masked_fill_(~fin, 0.0)
        v.masked_fill_(torch.isnan(xf), float(qmax - 2))
        v.masked_fill_(xf == math.inf, float(qmax - 1))
        v.masked_fill_(xf == -math.inf, float(qmax))
    del fin
    if valid is not None:
        v.masked_fill_(~valid, 0.0)
    q = v.to(torch.int32)
    del v
    P = 8 // bits
    q3 = q.view(M, G // P, P)
    packed = q3[:, :, 0]
    for k in range(1, P):  # scalar shifts: symbolic (FakeTensor) shapes broadcast cleanly
        packed = packed | (q3[:, :, k] << (k * bits))
    packed = packed.to(torch.uint8)
    return packed, flags.to(torch.uint8), scale, zero


def dequantize(codes: torch.Tensor, flags: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               shape, dtype: torch.dtype, bits: int = 8, group_size: int = 256, *,
               ch_div: int = 1, per_row: bool = True) -> torch.Tensor:
    """Inverse of `quantize`: a contiguous tensor of `shape` and `dtype`."""
    check_args(bits, group_size)
    G = group_size
    qmax = (1 << bits) - 1
    P = 8 // bits
    N = math.prod(shape)
    M = codes.shape[0]
    if bits == 8:
        q = codes.view(M, G).to(torch.int32)
    else:
        c = codes.to(torch.int32)
        q = torch.stack([(c >> (k * bits)) & qmax for k in range(P)], dim=2).view(M, G)
    qf = q.to(torch.float32)
    special = not _is_fake(codes) and bool(flags.any())   # as in quantize
    if not special:
        del q
    if per_row:
        y = qf.mul_(scale.float()[:, None]).add_(zero.float()[:, None]).view(-1)[:N]
    else:
        a, s_el = _per_channel(qf.view(-1)[:N], scale.float(), ch_div)
        _, z_el = _per_channel(qf.view(-1)[:N], zero.float(), ch_div)
        y = a.mul_(s_el).add_(z_el).reshape(-1)
    if special:
        flagged = flags.bool()[:, None].expand(M, G).reshape(-1)[:N]
        qn = q.view(-1)[:N]
        y = torch.where(flagged & (qn == qmax - 2), math.nan, y)
        y = torch.where(flagged & (qn == qmax - 1), math.inf, y)
        y = torch.where(flagged & (qn == qmax), -math.inf, y)
    return y.to(dtype).view(shape)


def error_bound(bits: int, x_range: float, stochastic: bool = False) -> float:
    """Largest |dequantize(quantize(x)) - x| for finite rows with range `x_range` (fp32)."""
    step = x_range / ((1 << bits) - 1)
    return (step if stochastic else step / 2) * (1 + 1e-4) + 1e-6 * x_range
