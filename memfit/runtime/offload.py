"""Offloaded saved activations: what backward needs waits in host memory, not on the device.

Inside an `OffloadedSaves` region, every tensor autograd saves for backward that passes the
gate (`skip_reason`) is copied to host memory (pinned on CUDA) on a side stream, and the device
copy is released as soon as the forward drops it. In backward, the unpack hook returns the
tensor brought back to the device; when it does, it starts bringing back the `prefetch`
tensors saved just before it (backward uses saved tensors in about the reverse order of
their saving), so their copies overlap the compute of the nodes in between.

Stream discipline on CUDA (`CudaStreams`), which is where offloading elsewhere has raced
(NaN gradients when the caching allocator hands a device block to the compute stream while
a side-stream copy still reads it):
- to host: the side stream first waits for the compute stream (the tensor is written); the
  copy runs on the side stream; the device tensor is marked used by the side stream
  (`record_stream`), so its block is not reused before the copy ends; an event marks the end.
- back to the device: the destination is allocated on the compute stream; the side stream
  waits for the compute stream (the block is free to write) and for the copy to host (the
  host buffer is filled); the copy runs on the side stream and the destination is marked used
  by it (a prefetched tensor freed unused is not reused mid-copy); an event marks its end, and
  the compute stream waits on it before the tensor is returned to autograd.
- host buffers stay alive as long as the saved tensor's handle: a second backward
  (`retain_graph=True`) copies them back again.
On CPU and on FakeTensors (`InlineStreams`) the same steps run synchronously: a host copy on
CPU is memory like any other, so offloading there saves nothing and the planner never offers
it; it runs on CPU only for tests and for the cost model's simulation. The CUDA steps are
written against a small backend (`CudaBackend`) so tests can run them on CPU with a stand-in
that records every call.

Not offloaded (kept as they are): parameters, buffers and inputs and views of them (their
storage stays anyway), tensors under `min_bytes`, non-strided or overlapping layouts, tensors
on another device than the region's. A storage saved several times (or as contiguous reshapes of it) is copied once per step.
Nesting: the pair of saved-tensor hooks active when a region is entered (an outer measurement,
the cost model) sees what the region stores: the host copies and the tensors it keeps.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Iterable

import torch

from memfit.runtime.quantized_save import _dense_permuted, share_key, storage_key


@dataclass(frozen=True)
class OffloadConfig:
    """min_bytes: smaller saved tensors stay on the device (a copy has a fixed cost);
    prefetch: tensors brought back ahead of the one backward asks for (0: each on demand);
    pin_memory: page-locked host buffers on CUDA (needed for copies that overlap compute)."""

    min_bytes: int = 1 << 20
    prefetch: int = 2
    pin_memory: bool = True

    def __post_init__(self):
        if self.min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {self.min_bytes}")
        if self.prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {self.prefetch}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class OffloadStats:
    offloaded: int = 0          # saved tensors copied to host
    shared: int = 0             # saves served by a copy already made this step
    bytes: int = 0              # bytes copied to host
    fetched: int = 0            # copies back to the device
    prefetched: int = 0         # of those, started ahead of use
    skipped: dict = field(default_factory=dict)   # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


# ----------------------------------------------------------------------------- streams

class InlineStreams:
    """Synchronous copies: CPU and FakeTensors (the cost model runs these same steps)."""

    def to_host(self, t: torch.Tensor, pin: bool):
        host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
        host.copy_(t)
        return host, None

    def to_device(self, host: torch.Tensor, device: torch.device, after):
        dev = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)
        dev.copy_(host)
        return dev, None

    def wait(self, token) -> None:
        pass


class CudaBackend:
    """The CUDA calls CudaStreams makes (tests substitute a recording stand-in on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def new_stream(self):
        return torch.cuda.Stream(device=self.device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def use_stream(self, stream):
        return torch.cuda.stream(stream)

    def new_event(self):
        return torch.cuda.Event()

    def pinned(self, t: torch.Tensor, pin: bool) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)


class CudaStreams:
    """Copies on side streams with the ordering in the module doc."""

    def __init__(self, backend):
        self.b = backend
        self.d2h = backend.new_stream()
        self.h2d = backend.new_stream()

    def to_host(self, t: torch.Tensor, pin: bool):
        b = self.b
        host = b.pinned(t, pin)
        self.d2h.wait_stream(b.current_stream())
        with b.use_stream(self.d2h):
            host.copy_(t, non_blocking=pin)
            done = b.new_event()
            done.record(self.d2h)
        b.record_stream(t, self.d2h)    # t's block is not reused before the copy has read it
        return host, done

    def to_device(self, host: torch.Tensor, device: torch.device, after):
        b = self.b
        dev = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=device)
        self.h2d.wait_stream(b.current_stream())    # dev's block is free to write
        if after is not None:
            self.h2d.wait_event(after)              # the host copy is complete
        with b.use_stream(self.h2d):
            dev.copy_(host, non_blocking=True)
            done = b.new_event()
            done.record(self.h2d)
        b.record_stream(dev, self.h2d)    # a prefetched tensor dropped unused is not reused mid-copy
        return dev, done

    def wait(self, token) -> None:
        if token is not None:
            self.b.current_stream().wait_event(token)


def streams_for(device: torch.device, fake: bool = False):
    """CudaStreams for real CUDA tensors, InlineStreams otherwise."""
    if device.type == "cuda" and not fake:
        return CudaStreams(CudaBackend(device))
    return InlineStreams()


# ----------------------------------------------------------------------------- the hooks

def _hint(v) -> int:
    if isinstance(v, torch.SymInt):
        n = v.node
        return int(n.hint if n.hint is not None else n.shape_env.size_hint(n.expr))
    return int(v)


def skip_reason(t: torch.Tensor, config: OffloadConfig, excluded: set, device: torch.device | None) -> str | None:
    """Why a saved tensor stays on the device, or None if it is offloaded."""
    if t.layout != torch.strided or t.numel() == 0:
        return "layout"
    if device is not None and t.device.type != device.type:
        return "other_device"
    if _hint(t.numel()) * t.element_size() < config.min_bytes:
        return "tiny"
    if storage_key(t) in excluded or (t.is_leaf and t.requires_grad):
        return "parameter_buffer_or_input"
    if not _dense_permuted(t):
        return "overlapping_or_strided"
    return None


class OffloadScope:
    """One forward step's shared state: storages never to offload, copies made (for sharing
    and for prefetching in backward), the streams."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), streams=None, device: torch.device | None = None):
        self.excluded: set[int] = {storage_key(t) for t in exclude if isinstance(t, torch.Tensor)}
        self.streams = streams
        self.device = device
        self.cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # storage -> {key: handle}
        self.order: list[weakref.ref] = []      # handles in saving order


class _Offloaded:
    """One saved tensor in host memory; `dev` holds it back on the device once fetched."""

    __slots__ = ("host", "done", "device", "index", "dev", "dev_done", "outer_unpack", "scope", "shape", "used",
                 "__weakref__")

    def fetch(self, stats: OffloadStats | None, ahead: bool) -> None:
        if self.dev is not None or (ahead and self.used):
            return    # fetched already; or backward has had it (a second one fetches on demand)
        host = self.outer_unpack(self.host) if self.outer_unpack is not None else self.host
        self.dev, self.dev_done = self.scope.streams.to_device(host, self.device, self.done)
        if stats is not None:
            stats.fetched += 1
            stats.prefetched += int(ahead)


class OffloadedSaves:
    """Context manager: offload what autograd saves inside it (see the module doc)."""

    def __init__(self, config: OffloadConfig | None = None, *, scope: OffloadScope, stats: OffloadStats | None = None):
        self.config = config or OffloadConfig()
        self.scope = scope
        self.stats = stats if stats is not None else OffloadStats()
        self._outer = None

    def __enter__(self):
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)  # noqa: SLF001
        self._outer = tuple(top) if top is not None else None
        torch._C._autograd._push_saved_tensors_default_hooks(self._pack, self._unpack)  # noqa: SLF001
        return self

    def __exit__(self, *exc):
        torch._C._autograd._pop_saved_tensors_default_hooks()  # noqa: SLF001
        return False

    def _pack(self, t: torch.Tensor):
        sc = self.scope
        reason = skip_reason(t, self.config, sc.excluded, sc.device)
        if reason is not None:
            self.stats.skip(reason)
            return ("kept", self._outer[0](t) if self._outer is not None else t.detach(), None)
        st = t.untyped_storage()
        key = share_key(t)
        per_storage = sc.cache.get(st)
        if per_storage is not None and key in per_storage:
            self.stats.shared += 1
            hit = per_storage[key]
            return ("offloaded", hit, None if tuple(t.shape) == hit.shape else tuple(t.shape))
        if sc.streams is None:
            sc.streams = streams_for(t.device, _is_fake(t))
        host, done = sc.streams.to_host(t.detach(), self.config.pin_memory)
        h = _Offloaded()
        h.outer_unpack = None
        if self._outer is not None:
            host = self._outer[0](host)
            h.outer_unpack = self._outer[1]
        h.host, h.done, h.device, h.dev, h.dev_done, h.scope, h.used = host, done, t.device, None, None, sc, False
        h.index = len(sc.order)
        h.shape = tuple(t.shape)
        sc.order.append(weakref.ref(h))
        sc.cache.setdefault(st, {})[key] = h
        self.stats.offloaded += 1
        self.stats.bytes += _hint(t.numel()) * t.element_size()
        return ("offloaded", h, None)

    def _unpack(self, packed) -> torch.Tensor:
        kind, obj, shape = packed
        if kind == "kept":
            return self._outer[1](obj) if self._outer is not None else obj
        h: _Offloaded = obj
        h.fetch(self.stats, ahead=False)
        h.used = True
        dev, done = h.dev, h.dev_done
        # the handle lets go: once autograd is done with it the block is free (a second
        # backward fetches again from the host copy)
        h.dev = h.dev_done = None
        order = h.scope.order
        for i in range(h.index - 1, max(h.index - 1 - self.config.prefetch, -1), -1):
            prev = order[i]()
            if prev is not None:
                prev.fetch(self.stats, ahead=True)
        h.scope.streams.wait(done)
        return dev if shape is None else dev.view(shape)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def offload_time_s(nbytes: int, bytes_per_s: float) -> float:
    """Seconds of copying a saved tensor to host and back at `bytes_per_s` each way; an upper
    bound on the step's extra time (the copies overlap compute, which this leaves out)."""
    return 2 * nbytes / bytes_per_s
