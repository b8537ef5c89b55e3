"""Kernel scratch, measured: run the real operator once and read the allocator.

Some kernels allocate and free memory inside themselves (oneDNN reorders activations and
weights into blocked layouts, keeps per-thread reduction buffers; cuDNN takes workspaces).
FakeTensors cannot see it, and how much there is depends on the CPU, the thread count and
the library version, so no constant can stand for it. A probe runs the operator once on
real tensors of the same shapes, strides, dtype and device (filled with zeros: these
kernels' allocations do not depend on values, and zeros leave the RNG untouched), and
reads the peak allocation during the call minus the bytes of the outputs it returns:

- CPU: the allocator's events from `torch.profiler` (`profile_memory=True`), the same
  events `memfit.measure` reads for the truth;
- CUDA: `torch.cuda.max_memory_allocated` around the call.

A probe is keyed by the operator overload, the arguments' shapes, strides and dtypes (the
"shape class"), the device (type, name, instruction set or compute capability), the
thread count, the torch version and the oneDNN or cuDNN version, and kept in memory and in
`$MEMFIT_CACHE_DIR/probes-v1.json` (default `$XDG_CACHE_HOME/memfit`, else
`~/.cache/memfit`); delete the file to clear it. A corrupt or unwritable file is logged and
ignored (the in-memory cache still works).

Probes stay small: when an operator's tensors exceed `PROBE_CAP_BYTES`, the operator is
probed at three smaller batch sizes instead and scratch = a + b * B is used, but only if the
third point agrees with the line through the other two; otherwise it is probed at the real
shape up to `HARD_CAP_BYTES`, and beyond that not at all (said in the plan's notes).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from memfit.cost_models.allocations import cpu_allocations, profiler_peak  # noqa: F401 - re-exported
from memfit.cost_models.probe_store import (CACHE_FILE, cache_dir, cache_path, clear_memo,  # noqa: F401 - re-exported
                                            device_signature, lookup, memoize, write_cache)
from memfit.ir.fx_utils import size_hint

log = logging.getLogger(__name__)

# Tensors (inputs plus outputs) a probe may allocate at the real shape; above it the probe
# extrapolates in the batch size. A convolution over 32 MiB of tensors takes tens of
# milliseconds on one core, and 32 MiB still holds three samples of a ResNet-50's widest
# layer at 224x224 (three samples are the least a line can be checked on).
PROBE_CAP_BYTES = 32 * 2**20
# Beyond this, a shape that could not be extrapolated is not probed: probing it would take
# as much memory as the kernel being planned for.
HARD_CAP_BYTES = 256 * 2**20
# A batch-size line is accepted when its prediction at the third point is this close.
LINEAR_RTOL = 0.02


def _aten(name: str, overload: str = "default"):
    packet = getattr(torch.ops.aten, name, None)
    return getattr(packet, overload, None) if packet is not None else None


@dataclass(frozen=True)
class _OpSpec:
    """Arguments that carry the batch in dim 0 (scaled together for batch extrapolation)."""

    batch_args: tuple[int, ...] = ()
    batch_kwargs: tuple[str, ...] = ()


# Operators probed, each because the profiler showed scratch inside it on CPU at the sizes
# of the test models (figures in docs/architecture.md, "Known scratch inside kernels").
# Every other operator is taken to have none: mm/addmm/bmm, layer norm, softmax and most
# elementwise kernels measured 0 bytes or a few bytes per thread.
_PROBED: dict[Any, _OpSpec] = {
    op: spec for op, spec in (
        (_aten("convolution"), _OpSpec(batch_args=(0,))),
        (_aten("convolution_backward"), _OpSpec(batch_args=(0, 1))),
        (_aten("native_batch_norm_backward"), _OpSpec(batch_args=(0, 1))),
        (_aten("_safe_softmax"), _OpSpec(batch_args=(0,))),
        # logsumexp computes exp(x - max) whole, then sums it (chunked-ce's forward per chunk)
        (_aten("logsumexp"), _OpSpec(batch_args=(0,))),
        (_aten("_scaled_dot_product_flash_attention_for_cpu"),
         _OpSpec(batch_args=(0, 1, 2), batch_kwargs=("attn_mask",))),
        (_aten("_scaled_dot_product_flash_attention_for_cpu_backward"),
         _OpSpec(batch_args=(0, 1, 2, 3, 4, 5), batch_kwargs=("attn_mask",))),
    ) if op is not None
}


# ----------------------------------------------------------------------------- arguments

@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: torch.Tensor) -> "_TensorMeta":
        return cls(tuple(size_hint(s) for s in t.shape), tuple(size_hint(s) for s in t.stride()),
                   t.dtype, t.device)

    @property
    def nbytes(self) -> int:
        if any(s == 0 for s in self.shape):
            return 0
        span = 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))
        return span * self.dtype.itemsize

    def with_batch(self, b: int) -> "_TensorMeta":
        """Same layout (dimension order by stride) with dim 0 set to `b`; dense."""
        shape = (b,) + self.shape[1:]
        order = sorted(range(len(shape)), key=lambda d: (-self.stride[d], d))
        stride = [0] * len(shape)
        acc = 1
        for d in reversed(order):
            stride[d] = acc
            acc *= max(shape[d], 1)
        return _TensorMeta(shape, tuple(stride), self.dtype, self.device)

    def describe(self, batch_symbol: bool = False) -> str:
        dims = ["B" if (batch_symbol and i == 0) else str(s) for i, s in enumerate(self.shape)]
        if batch_symbol:  # the line is probed on dense tensors in this dimension order
            order = sorted(range(len(self.shape)), key=lambda d: (-self.stride[d], d))
            layout = "order " + ",".join(map(str, order))
        else:
            layout = ",".join(map(str, self.stride))
        return f"{str(self.dtype).removeprefix('torch.')}[{','.join(dims)}]({layout})"

    def materialize(self) -> torch.Tensor:
        return torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device).zero_()


def _metas(args, kwargs):
    """Arguments with tensors replaced by _TensorMeta and symbolic ints by their hints."""
    def conv(a):
        if isinstance(a, torch.Tensor):
            return _TensorMeta.of(a)
        if isinstance(a, torch.SymInt):
            return size_hint(a)
        if isinstance(a, (torch.SymFloat, torch.SymBool)):
            return a.node.hint if a.node.hint is not None else a.node.shape_env.sizesize_hint(a.node.expr)
        return a
    return pytree.tree_map(conv, (tuple(args), dict(kwargs or {})))


class _BatchClass:
    """A batch-carrying tensor in a key of a batch-size line: its batch size left out."""

    def __init__(self, meta: _TensorMeta):
        self.meta = meta

    def describe(self) -> str:
        return self.meta.describe(batch_symbol=True)


def _describe(x) -> str:
    if isinstance(x, (_TensorMeta, _BatchClass)):
        return x.describe()
    if isinstance(x, (list, tuple)):
        return "[" + ",".join(_describe(a) for a in x) + "]"
    if isinstance(x, dict):
        return "{" + ",".join(f"{k}={_describe(v)}" for k, v in sorted(x.items())) + "}"
    return repr(x)


def _batch_of(spec: _OpSpec, margs) -> int:
    """Batch size: dim 0 of the first batch-carrying argument (0 when there is none)."""
    for i in spec.batch_args:
        if i < len(margs) and isinstance(margs[i], _TensorMeta) and margs[i].shape:
            return margs[i].shape[0]
    return 0


def _map_batch(spec: _OpSpec, margs, mkwargs, batch: int, fn):
    """`margs`, `mkwargs` with `fn` applied to each batch-carrying tensor (dim 0 == batch;
    a mask broadcast over the batch keeps its size 1)."""
    def hit(m):
        return isinstance(m, _TensorMeta) and m.shape and m.shape[0] == batch
    a = tuple(fn(m) if i in spec.batch_args and hit(m) else m for i, m in enumerate(margs))
    k = {n: (fn(m) if n in spec.batch_kwargs and hit(m) else m) for n, m in mkwargs.items()}
    return a, k


def _key(func, margs, mkwargs, batch: int | None = None) -> str:
    if batch is not None:
        margs, mkwargs = _map_batch(_PROBED.get(func, _OpSpec()), margs, mkwargs, batch, _BatchClass)
    shape = ("batch-line " if batch is not None else "") + _describe(margs) + _describe(mkwargs)
    return "|".join([str(func), shape, device_signature(_device_of(margs, mkwargs)),
                     f"threads={torch.get_num_threads()}", f"torch-{torch.__version__}"])


def probe_key(func, args, kwargs=None, *, batch_line: bool = False) -> str:
    """The cache key of a probe of `func(*args, **kwargs)` in this process's environment:
    operator, shapes/strides/dtypes and other arguments, device and kernel library, thread
    count, torch version. `batch_line`: the key of the line in the batch size instead."""
    margs, mkwargs = _metas(args, kwargs)
    return _key(func, margs, mkwargs, _batch_of(_PROBED.get(func, _OpSpec()), margs) if batch_line else None)


def _device_of(margs, mkwargs) -> torch.device:
    for m in pytree.tree_leaves((margs, mkwargs)):
        if isinstance(m, (_TensorMeta, _BatchClass)):
            return getattr(m, "meta", m).device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- measuring

def _new_bytes(out, inputs) -> int:
    """Bytes of the storages in `out` (real or fake) that are not among the inputs' storages."""
    ins = [t.untyped_storage() for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    seen: list = []
    total = 0
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            if not any(st is x for x in ins) and not any(st is x for x in seen):
                seen.append(st)
                total += size_hint(st.nbytes())
    return total


class ProbeUnavailable(RuntimeError):
    """The probe cannot run here (no such device, a profiler already running, ...)."""


def measure_scratch(func, args, kwargs=None) -> int:
    """Scratch bytes of one real call of `func`: peak allocated during it minus its new outputs.

    `args`/`kwargs` may hold real or fake tensors (symbolic sizes are read at their hints);
    real zero-filled tensors of the same shapes, strides, dtypes and device are made for
    the call. Raises ProbeUnavailable when it cannot run here.
    """
    margs, mkwargs = _metas(args, kwargs)
    return _measure(func, margs, mkwargs)


def _measure(func, margs, mkwargs) -> int:
    from torch.utils._python_dispatch import _disable_current_modes

    device = _device_of(margs, mkwargs)
    if device.type not in ("cpu", "cuda"):
        raise ProbeUnavailable(f"no probe for {device.type} tensors")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProbeUnavailable("planning for CUDA without a CUDA device here")
    if device.type == "cpu" and torch._C._autograd._profiler_enabled():  # noqa: SLF001
        raise ProbeUnavailable("a torch.profiler session is already running (they do not nest)")

    # The tracker calls in from inside fake mode: real tensors need every mode off.
    with _disable_current_modes(), torch.no_grad():
        def real(m):
            return m.materialize() if isinstance(m, _TensorMeta) else m
        rargs, rkwargs = pytree.tree_map(real, (margs, mkwargs))
        if device.type == "cuda":
            # The first call may pick algorithms (cudnn.benchmark) or create the cuBLAS
            # workspace, both kept afterwards: measure a steady-state call. This resets the
            # device's peak-memory statistics.
            func(*rargs, **rkwargs)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = func(*rargs, **rkwargs)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            with cpu_allocations() as prof:
                out = func(*rargs, **rkwargs)
            peak = profiler_peak(prof)
        out_bytes = _new_bytes(out, (rargs, rkwargs))
        del out, rargs, rkwargs
    return max(0, peak - out_bytes)


def _store(key: str, entry: dict) -> None:
    memoize(key, entry)
    rec = _recorder()
    if rec is not None:
        rec.pending[key] = entry
    else:
        write_cache(cache_path(), {key: entry})


# ----------------------------------------------------------------------------- recording

@dataclass
class ProbeRecord:
    """What one analysis probed: distinct probe keys by operator, and where each came from."""

    device: str = ""
    ops: dict[str, set] = field(default_factory=dict)     # operator -> probe keys used
    cached: set = field(default_factory=set)               # keys not measured by this analysis
    extrapolated: set = field(default_factory=set)         # keys from a batch-size line
    skipped: dict[str, str] = field(default_factory=dict)  # key -> reason it was not probed
    pending: dict[str, dict] = field(default_factory=dict)

    def note(self) -> str | None:
        """One line for the plan's notes, None when nothing was probed."""
        keys = set().union(*self.ops.values()) if self.ops else set()
        if not keys and not self.skipped:
            return None
        by_op = ", ".join(f"{op.removesuffix('.default')} x{len(k)}" for op, k in sorted(self.ops.items()))
        line = (f"kernel scratch probed on {self.device or 'cpu'} ({len(keys)} probes, "
                f"{len(keys & self.cached)} from cache): {by_op or 'none'}")
        if self.extrapolated:
            line += f"; {len(self.extrapolated & keys)} extrapolated in the batch size"
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            line += f"; {len(self.skipped)} not probed ({'; '.join(reasons)}), taken as 0 bytes"
        return line


# A process-wide stack, not a context variable: backward of CUDA tensors runs in autograd's
# device threads, which do not inherit the analysis thread's context.
_RECORDERS: list[ProbeRecord] = []


def _recorder() -> ProbeRecord | None:
    return _RECORDERS[-1] if _RECORDERS else None


@contextlib.contextmanager
def recording():
    """Collect what the probes of one analysis did; write new results to disk once at the end."""
    rec = ProbeRecord()
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)
        if rec.pending:
            write_cache(cache_path(), rec.pending)
            rec.pending = {}


# ----------------------------------------------------------------------------- entry point

class _NotProbed(Exception):
    pass


def kernel_scratch_bytes(func, args, kwargs=None, out=None) -> int:
    """Scratch bytes inside `func`'s kernel for these arguments, probed (and cached).

    `out`: the (fake) outputs, to size the probe before running it. 0 for operators with
    no measured scratch, and for devices or shapes that cannot be probed here (those are
    recorded for the plan's note).
    """
    spec = _PROBED.get(func)
    if spec is None:
        return 0
    try:
        margs, mkwargs = _metas(args, kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. a data-dependent size with no hint
        log.info("memfit: kernel scratch of %s not probed: %s", func, e)
        rec = _recorder()
        if rec is not None:
            rec.skipped[f"{func}|{e}"] = "sizes without a value"
        return 0
    device = _device_of(margs, mkwargs)
    if device.type not in ("cpu", "cuda"):
        return 0
    rec = _recorder()
    in_bytes = sum(m.nbytes for m in pytree.tree_leaves((margs, mkwargs)) if isinstance(m, _TensorMeta))
    out_bytes = _new_bytes(out, (args, kwargs))
    size = in_bytes + out_bytes
    batch = _batch_of(spec, margs)
    why_not_line = "no batch dimension"
    try:
        if size > PROBE_CAP_BYTES and batch >= 4:
            key = _key(func, margs, mkwargs, batch)
            entry, cached = _get(key, func, lambda: _batch_line(func, spec, margs, mkwargs, batch, out_bytes))
            if entry.get("linear"):
                _record(rec, key, func, device, cached=cached, extrapolated=True)
                return max(0, round(entry["a"] + entry["b"] * batch))
            why_not_line = entry.get("why", "not linear in the batch size")
        key = _key(func, margs, mkwargs)
        if size > HARD_CAP_BYTES and lookup(key) is None:
            raise _NotProbed(f"tensors over {HARD_CAP_BYTES // 2**20} MiB, {why_not_line}")
        entry, cached = _get(key, func, lambda: {"scratch_bytes": _measure(func, margs, mkwargs)})
    except _NotProbed as e:
        log.info("memfit: kernel scratch of %s not probed: %s", func, e)
        if rec is not None:
            rec.device = rec.device or device.type
            rec.skipped[_key(func, margs, mkwargs)] = str(e)
        return 0
    _record(rec, key, func, device, cached=cached)
    return int(entry["scratch_bytes"])


def _get(key: str, func, measure) -> tuple[dict, bool]:
    """(entry, whether it came from a cache); measures and stores it on a miss."""
    entry = lookup(key)
    if entry is not None:
        return entry, True
    try:
        entry = measure()
    except ProbeUnavailable as e:
        raise _NotProbed(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a failed probe must not fail the plan
        log.info("memfit: probe of %s failed: %s: %s", func, type(e).__name__, e)
        raise _NotProbed(f"{func} raised on its probe") from None
    log.info("memfit: probed %s: %d bytes of scratch", key, entry["scratch_bytes"])
    _store(key, entry)
    return entry, False


def _batch_line(func, spec: _OpSpec, margs, mkwargs, batch: int, out_bytes: int) -> dict:
    """Scratch at three batch sizes under the cap, and the line through the two largest;
    `linear` says whether the smallest agrees with it (within LINEAR_RTOL)."""
    def total(a, k):
        return sum(m.nbytes for m in pytree.tree_leaves((a, k)) if isinstance(m, _TensorMeta))

    # Outputs are counted as if they all grew with the batch: an upper bound.
    fixed = total(*_map_batch(spec, margs, mkwargs, batch, lambda m: m.with_batch(0)))
    per_sample = total(*_map_batch(spec, margs, mkwargs, batch, lambda m: m.with_batch(1))) - fixed
    per_sample += out_bytes / batch
    hi = batch if per_sample <= 0 else min(batch, int((PROBE_CAP_BYTES - fixed) // per_sample))
    if hi < 3:
        return {"scratch_bytes": 0, "linear": False, "why": "three samples are over the probe cap"}
    points = (hi // 4, hi // 2, hi) if hi >= 8 else (hi - 2, hi - 1, hi)
    got = {b: _measure(func, *_map_batch(spec, margs, mkwargs, batch, lambda m, b=b: m.with_batch(b)))
           for b in points}
    lo, mid, top = points
    slope = (got[top] - got[mid]) / (top - mid)
    intercept = got[top] - slope * top
    pred = intercept + slope * lo
    linear = abs(pred - got[lo]) <= LINEAR_RTOL * max(got[lo], pred, 1)
    return {"scratch_bytes": got[top], "linear": linear, "a": intercept, "b": slope,
            "points": {str(b): got[b] for b in points}}


def _record(rec, key, func, device, *, cached, extrapolated=False):
    if rec is None:
        return
    rec.device = rec.device or device.type
    keys = rec.ops.setdefault(str(func), set())
    if cached and key not in keys:  # a repeat of a probe made by this analysis is not a cache hit
        rec.cached.add(key)
    keys.add(key)
    if extrapolated:
        rec.extrapolated.add(key)


# ----------------------------------------------------------------------------- host transfers

TRANSFER_PROBE_BYTES = 64 << 20


def host_transfer_bytes_per_s(device: torch.device) -> float:
    """Pinned host <-> device copy bandwidth of `device` (the slower direction), measured once
    per device signature on a 64 MiB buffer (best of 3 each way) and cached like the kernel
    probes. Offloaded saved activations are priced with it (memfit.passes.offload)."""
    import time

    key = f"host_transfer|{device_signature(device)}"
    entry = lookup(key)
    if entry is None:
        n = TRANSFER_PROBE_BYTES
        dev = torch.empty(n, dtype=torch.uint8, device=device)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        rates = []
        for dst, src in ((host, dev), (dev, host)):
            best = float("inf")
            for _ in range(3):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                dst.copy_(src, non_blocking=True)
                torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - t0)
            rates.append(n / best)
        entry = {"kind": "host_transfer", "bytes_per_s": min(rates), "d2h_bytes_per_s": rates[0], "h2d_bytes_per_s": rates[1]}
        log.info("memfit: probed host transfers on %s: %.1f GB/s", device, entry["bytes_per_s"] / 1e9)
        _store(key, entry)
    return float(entry["bytes_per_s"])
