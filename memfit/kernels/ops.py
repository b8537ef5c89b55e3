"""The quantization kernels as PyTorch custom operators, for compiled graphs.

`torch.ops.memfit.quantize_saved(x, bits, group_size)` -> (codes, flags, scale, zero) and
`torch.ops.memfit.dequantize_saved(codes, flags, scale, zero, shape, dtype, bits,
group_size)` -> tensor are the same kernels as `memfit.kernels.dispatch` (Triton on CUDA,
the torch reference elsewhere; format in `memfit.kernels.reference`), wrapped with
`torch.library.custom_op` and a fake (meta) implementation, so they can sit in an fx graph
that AOTAutograd and Inductor compile: Inductor calls them as opaque kernels and never
decomposes them, and FakeTensor propagation gets exact output shapes, also for symbolic
sizes. The torch.compile backend inserts them around saved tensors
(`memfit.compile.quantized_saves`).

Importing this module registers the operators (once per process).
"""

from __future__ import annotations

import torch

from memfit.kernels import dispatch, reference

_NS = "memfit"


@torch.library.custom_op(f"{_NS}::quantize_saved", mutates_args=())
def quantize_saved(x: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                        torch.Tensor, torch.Tensor]:
    """Per-row (group_size elements) quantization of x's contiguous flat order."""
    codes, flags, scale, zero = dispatch.quantize(x, bits, group_size)
    return codes, flags, scale.float().contiguous(), zero.float().contiguous()


@quantize_saved.register_fake
def _(x, bits, group_size):
    reference.check_args(bits, group_size)
    if x.dtype not in reference.FLOAT_DTYPES:
        raise TypeError(f"quantize_saved takes float32, float16 or bfloat16, got {x.dtype}")
    rows = (x.numel() + group_size - 1) // group_size   # callers never pass empty tensors
    codes = x.new_empty((rows, group_size * bits // 8), dtype=torch.uint8)
    flags = x.new_empty((rows,), dtype=torch.uint8)
    scale = x.new_empty((rows,), dtype=torch.float32)
    zero = x.new_empty((rows,), dtype=torch.float32)
    return codes, flags, scale, zero


@torch.library.custom_op(f"{_NS}::dequantize_saved", mutates_args=())
def dequantize_saved(codes: torch.Tensor, flags: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                     shape: list[int], dtype: torch.dtype, bits: int, group_size: int) -> torch.Tensor:
    """Inverse of quantize_saved: a new contiguous tensor of `shape` and `dtype`."""
    return dispatch.dequantize(codes, flags, scale, zero, tuple(shape), dtype, bits, group_size).contiguous()


@dequantize_saved.register_fake
def _(codes, flags, scale, zero, shape, dtype, bits, group_size):
    reference.check_args(bits, group_size)
    return codes.new_empty(tuple(shape), dtype=dtype)


def packed_nbytes(numel: int, bits: int, group_size: int) -> int:
    """Bytes the four outputs of quantize_saved hold for `numel` elements."""
    return reference.packed_bytes(numel, bits, group_size)
