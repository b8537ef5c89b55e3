"""Pick the quantization kernels: Triton on CUDA tensors, the torch reference elsewhere.

`MEMFIT_KERNELS=triton` (environment) or `force_backend("triton")` runs the Triton kernels
on any device; on CPU this needs `TRITON_INTERPRET=1` set before Triton is first imported
(the kernel tests do that). `MEMFIT_KERNELS=reference` forces the reference everywhere.
FakeTensors (the cost model's simulation) always take the reference: same output shapes,
no kernel launch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

from memfit.kernels import reference

log = logging.getLogger(__name__)

_BACKENDS = ("auto", "triton", "reference")
_forced: list[str] = []


@functools.lru_cache(maxsize=1)
def _triton_module():
    """memfit.kernels.triton.quant, or None (with the reason logged once) if Triton is missing."""
    try:
        from memfit.kernels.triton import quant
        return quant
    except Exception as e:  # noqa: BLE001 - any import failure means "no Triton"
        log.info("Triton kernels unavailable (%s: %s); using the torch reference", type(e).__name__, e)
        return None


def backend() -> str:
    """The backend asked for: the innermost `force_backend`, else $MEMFIT_KERNELS, else auto."""
    if _forced:
        return _forced[-1]
    b = os.environ.get("MEMFIT_KERNELS", "auto").lower()
    if b not in _BACKENDS:
        raise ValueError(f"MEMFIT_KERNELS must be one of {', '.join(_BACKENDS)}, got {b!r}")
    return b


@contextlib.contextmanager
def force_backend(name: str):
    """Run the enclosed kernels on `name` ("auto", "triton" or "reference")."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _impl(t: torch.Tensor):
    if _is_fake(t):
        return reference
    b = backend()
    if b == "reference":
        return reference
    if b == "auto" and t.device.type != "cuda":
        return reference
    mod = _triton_module()
    if mod is None:
        if b == "triton":
            raise RuntimeError("MEMFIT_KERNELS=triton but Triton could not be imported; "
                               "pip install triton (and on CPU set TRITON_INTERPRET=1)")
        return reference
    return mod


def quantize(x: torch.Tensor, bits: int = 8, group_size: int = 256, **kw):
    """(codes, flags, scale, zero); see memfit.kernels.reference.quantize."""
    return _impl(x).quantize(x, bits, group_size, **kw)


def dequantize(codes, flags, scale, zero, shape, dtype, bits: int = 8, group_size: int = 256, **kw):
    """Inverse of `quantize`; see memfit.kernels.reference.dequantize."""
    return _impl(codes).dequantize(codes, flags, scale, zero, shape, dtype, bits, group_size, **kw)


# Memory traffic of one quantize + dequantize pair relative to the bandwidth model's
# 2 * (tensor bytes + packed bytes): the Triton kernels make one pass each (1.0); the torch
# reference makes many full-size passes (float copy, finiteness, min/max, scale, round,
# clamp, pack): measured 27x-50x the model at clone bandwidth for 2^18..2^22 fp32 elements
# on a 2-core x86 CPU with one thread (torch 2.13), so 30.
REFERENCE_TRAFFIC_FACTOR = 30.0


def traffic_factor(device: torch.device | str) -> float:
    """What `device`'s quantize/dequantize kernels cost relative to one pass each."""
    dev = torch.device(device)
    b = backend()
    if b == "reference" or (b == "auto" and dev.type != "cuda") or _triton_module() is None:
        return REFERENCE_TRAFFIC_FACTOR
    return 1.0
