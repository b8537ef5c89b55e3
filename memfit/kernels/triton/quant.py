"""Triton kernels for activation quantization; the format is documented in
`memfit.kernels.reference`, which these kernels match bit for bit (tested under
TRITON_INTERPRET=1, which must be set before `import triton`).

Layers (Liger-Kernel style): `_quantize_kernel` / `_dequantize_kernel` (Triton), the
launchers `quantize` / `dequantize` that pick block sizes, and the dispatch in
`memfit.kernels.dispatch`.

Interpreter-compatible choices: no `tl.round` (floor(v + r)); values are clamped before the
integer cast; no libdevice calls; bfloat16 is rounded to nearest-even by hand (the
interpreter truncates when it casts float32 to bfloat16) and stored through an int16 view.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from memfit.kernels.reference import _GOLDEN, _M32, check_args, n_rows

# Elements one program handles: 4096 keeps the interpreter's numpy arrays small and, on a
# GPU, gives each of 4 warps 32 elements per thread (not tuned on hardware yet).
_BLOCK_ELEMS = 4096


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, flags_ptr, scale_ptr, zero_ptr, N, M, ch_div, n_ch, seed_mix,
                     G: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr,
                     ROW_RANGES: tl.constexpr, STOCHASTIC: tl.constexpr):
    P: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // P
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)          # (ROWS,)
    cols = tl.arange(0, G).to(tl.int64)
    offs = rows[:, None] * G + cols[None, :]                                   # (ROWS, G)
    valid = offs < N
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    fin = tl.abs(x) < float("inf")
    bad = ((fin == 0) & valid).to(tl.int32)
    flag = tl.max(bad, axis=1)                                                 # (ROWS,)
    qf = tl.where(flag > 0, QMAX - 3, QMAX).to(tl.float32)
    row_ok = rows < M
    if ROW_RANGES:
        use = fin & valid
        lo = tl.min(tl.where(use, x, float("inf")), axis=1)
        hi = tl.max(tl.where(use, x, float("-inf")), axis=1)
        zero = tl.where(lo <= hi, lo, 0.0)
        scale = tl.where(hi > lo, (hi - lo) / tl.maximum(qf, 1.0), 1.0)
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        tl.store(zero_ptr + rows, zero, mask=row_ok)
        s = scale[:, None]
        z = zero[:, None]
    else:
        ch = (offs // ch_div) % n_ch
        s = tl.load(scale_ptr + ch)
        z = tl.load(zero_ptr + ch)
    v = (x - z) / s
    if STOCHASTIC:
        h = offs.to(tl.uint32) + seed_mix.to(tl.uint32)
        h = h ^ (h >> 16)
        h = h * 0x7FEB352D
        h = h ^ (h >> 15)
        h = h * 0x846CA68B
        h = h ^ (h >> 16)
        r = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
    else:
        r = 0.5
    q = tl.floor(v + r)
    q = tl.minimum(tl.maximum(q, 0.0), qf[:, None])
    q = tl.where(fin, q, 0.0)
    q = tl.where(x != x, QMAX - 2, q)
    q = tl.where(x == float("inf"), QMAX - 1, q)
    q = tl.where(x == float("-inf"), QMAX, q)
    q = tl.where(valid, q, 0.0).to(tl.int32)
    # Pack P codes per byte, first code in the low bits.
    q3 = tl.reshape(q, (ROWS, GB, P))
    shifts = (tl.arange(0, P) * BITS)[None, None, :]
    packed = tl.sum(q3 << shifts, axis=2)                                      # (ROWS, GB)
    bcols = tl.arange(0, GB).to(tl.int64)
    tl.store(codes_ptr + rows[:, None] * GB + bcols[None, :], packed.to(tl.uint8), mask=row_ok[:, None])
    tl.store(flags_ptr + rows, flag.to(tl.uint8), mask=row_ok)


@triton.jit
def _dequantize_kernel(codes_ptr, flags_ptr, scale_ptr, zero_ptr, out_ptr, N, M, ch_div, n_ch,
                       G: tl.constexpr, BITS: tl.constexpr, ROWS: tl.constexpr,
                       ROW_RANGES: tl.constexpr, OUT_BF16: tl.constexpr):
    P: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // P
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_ok = rows < M
    bcols = tl.arange(0, GB).to(tl.int64)
    c = tl.load(codes_ptr + rows[:, None] * GB + bcols[None, :], mask=row_ok[:, None], other=0).to(tl.int32)
    shifts = (tl.arange(0, P) * BITS)[None, None, :]
    q = tl.reshape((c[:, :, None] >> shifts) & QMAX, (ROWS, G))
    cols = tl.arange(0, G).to(tl.int64)
    offs = rows[:, None] * G + cols[None, :]
    valid = offs < N
    flag = tl.load(flags_ptr + rows, mask=row_ok, other=0).to(tl.int32)[:, None] > 0
    if ROW_RANGES:
        s = tl.load(scale_ptr + rows, mask=row_ok, other=1.0)[:, None]
        z = tl.load(zero_ptr + rows, mask=row_ok, other=0.0)[:, None]
    else:
        ch = (offs // ch_div) % n_ch
        s = tl.load(scale_ptr + ch)
        z = tl.load(zero_ptr + ch)
    y = q.to(tl.float32) * s + z
    y = tl.where(flag & (q == QMAX - 2), float("nan"), y)
    y = tl.where(flag & (q == QMAX - 1), float("inf"), y)
    y = tl.where(flag & (q == QMAX), float("-inf"), y)
    if OUT_BF16:
        # Round to nearest even by hand; NaN becomes the canonical 0x7FC0 as in torch.
        b = y.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        b = tl.where(y != y, 0x7FC0, b)
        tl.store(out_ptr + offs, b.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
    else:
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=valid)


def _rows_per_program(group_size: int, m: int) -> int:
    rows = max(1, _BLOCK_ELEMS // group_size)
    return min(rows, triton.next_power_of_2(m))


def _seed_mix(seed: int) -> int:
    v = (seed * _GOLDEN) & _M32
    return v - (1 << 32) if v >= (1 << 31) else v  # passed as int32


def quantize(x: torch.Tensor, bits: int = 8, group_size: int = 256, *, scale: torch.Tensor | None = None,
             zero: torch.Tensor | None = None, ch_div: int = 1, stochastic: bool = False,
             seed: int = 0):
    """Launch `_quantize_kernel`; same signature and results as reference.quantize."""
    check_args(bits, group_size)
    x = x.detach().contiguous()
    N = x.numel()
    G = group_size
    M = n_rows(N, G)
    codes = torch.empty((M, G * bits // 8), dtype=torch.uint8, device=x.device)
    flags = torch.empty((M,), dtype=torch.uint8, device=x.device)
    row_ranges = scale is None
    if row_ranges:
        scale = torch.empty((M,), dtype=torch.float32, device=x.device)
        zero = torch.empty((M,), dtype=torch.float32, device=x.device)
        n_ch = 1
    else:
        scale = scale.float().contiguous()
        zero = zero.float().contiguous()
        n_ch = scale.numel()
    rows = _rows_per_program(G, M)
    grid = (triton.cdiv(M, rows),)
    _quantize_kernel[grid](x, codes, flags, scale, zero, N, M, ch_div, n_ch, _seed_mix(seed),
                           G=G, BITS=bits, ROWS=rows, ROW_RANGES=row_ranges, STOCHASTIC=stochastic)
    return codes, flags, scale, zero


def dequantize(codes, flags, scale, zero, shape, dtype, bits: int = 8, group_size: int = 256, *,
               ch_div: int = 1, per_row: bool = True) -> torch.Tensor:
    """Launch `_dequantize_kernel`; same signature and result as reference.dequantize."""
    check_args(bits, group_size)
    N = math.prod(shape)
    M = codes.shape[0]
    out = torch.empty(tuple(shape), dtype=dtype, device=codes.device)
    rows = _rows_per_program(group_size, M)
    grid = (triton.cdiv(M, rows),)
    target = out.view(torch.int16) if dtype == torch.bfloat16 else out
    _dequantize_kernel[grid](codes, flags, scale.float().contiguous(), zero.float().contiguous(), target,
                             N, M, ch_div, 1 if per_row else scale.numel(),
                             G=group_size, BITS=bits, ROWS=rows, ROW_RANGES=per_row,
                             OUT_BF16=dtype == torch.bfloat16)
    return out
