"""Quantized saved activations in eager PyTorch (Mesa, Pan et al. 2021; ActNN, Chen et al. 2021).

Inside a `QuantizedSaves` region, every tensor autograd saves for backward goes through a
pack hook that stores it in `bits` bits (codes + per-row flags + float32 ranges) and an
unpack hook that dequantizes it when backward needs it
(`torch.autograd.graph.saved_tensors_hooks`).

Not quantized (kept as they are): parameters, buffers and inputs and any view of them (their
storage is alive anyway: compared by storage identity, not `isinstance(Parameter)`, since
linear saves `W.t()`), non-float tensors (masks, indices), tensors under `min_bytes`.
A storage saved several times (the same tensor saved by two ops, or identical views) is
quantized once per step.

Ranges: head-wise for attention tensors (one range per head h of a (B, H, T, *) tensor or of
its (B*H, T, *) reshape), per row of `group_size` elements with dynamic ranges otherwise; with
`ema=True` the head-wise (or, for other tensors, per-tensor) ranges are running averages of
the per-step min/max, kept per saved-tensor slot (region name, index of the save in the
region), as Mesa does.

Nesting: only the innermost pair of saved-tensor hooks is active in PyTorch. A region looks
up the pair active when it is entered (an outer measurement or the cost model's simulation)
and hands it what it stores instead: the outer pack sees the codes, flags and ranges (so
measured and predicted saved bytes are the quantized ones) and the tensors it skips.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from memfit.kernels import dispatch, reference

log = logging.getLogger(__name__)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class QuantConfig:
    """Options of activation quantization (validated here, JSON via to_dict/from_dict).

    bits: 8 (default), 4 or 2. group_size: elements per row of codes; rows carry the
    NaN/Inf flag and, with dynamic ranges, their own scale and zero point. headwise: one range
    per attention head for attention tensors. ema: running (exponential moving average,
    `momentum`) ranges instead of per-step ones. stochastic: unbiased stochastic rounding
    (`seed` seeds the generator the per-save seeds are drawn from). min_bytes: smaller saved
    tensors are kept as they are.
    """

    bits: int = 8
    group_size: int = 256
    headwise: bool = True
    ema: bool = False
    momentum: float = 0.9
    stochastic: bool = False
    seed: int = 0
    min_bytes: int = 4096

    def __post_init__(self):
        reference.check_args(self.bits, self.group_size)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.min_bytes < 0:
            raise ValueError(f"min_bytes must be >= 0, got {self.min_bytes}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(**d)


@dataclass
class QuantStats:
    quantized: int = 0
    shared: int = 0            # saves served from an already quantized storage
    bytes_in: int = 0          # bytes of the tensors quantized
    bytes_out: int = 0         # bytes stored for them
    skipped: dict = field(default_factory=dict)   # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class QuantState:
    """State kept across steps: running ranges per slot, counters, the seed generator."""

    def __init__(self, config: QuantConfig):
        self.config = config
        self.ema: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.stats = QuantStats()
        self.generator = torch.Generator().manual_seed(config.seed)


def storage_key(t: torch.Tensor) -> int:
    """Identity of t's storage (shared by every view of it); works on FakeTensors."""
    return t.untyped_storage()._cdata  # noqa: SLF001


class StepScope:
    """What one forward step shares: storages never to quantize, and quantized storages.

    `exclude`: tensors (parameters, buffers, inputs) whose storages stay as they are.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self.excluded: set[int] = set()
        for t in exclude:
            if isinstance(t, torch.Tensor):
                self.excluded.add(storage_key(t))
        # storage object -> {(offset, shape, stride, dtype, version): packed}; weak, so a
        # freed storage whose address is reused never hits a stale entry.
        self.cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Packed:
    """A quantized saved tensor; `parts` went through the outer hooks if there were any."""

    __slots__ = ("parts", "outer_unpack", "shape", "stride", "dtype", "bits", "group_size", "ch_div",
                 "per_row", "__weakref__")

    def dequantize(self, shape=None) -> torch.Tensor:
        parts = self.parts
        if self.outer_unpack is not None:
            parts = [self.outer_unpack(p) for p in parts]
        codes, flags, scale, zero = parts
        y = dispatch.dequantize(codes, flags, scale, zero, self.shape, self.dtype, self.bits,
                                self.group_size, ch_div=self.ch_div, per_row=self.per_row)
        if shape is not None:
            return y.view(shape)
        if self.stride is not None:
            out = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=y.device)
            out.copy_(y)
            return out
        return y


class _View:
    """Another contiguous shape of an already quantized saved tensor."""

    __slots__ = ("packed", "shape")

    def __init__(self, packed: _Packed, shape):
        self.packed = packed
        self.shape = shape

    def dequantize(self) -> torch.Tensor:
        return self.packed.dequantize(self.shape)


class _Kept:
    """A saved tensor left as it is (through the outer hooks if any)."""

    __slots__ = ("obj", "outer_unpack")

    def __init__(self, obj, outer_unpack):
        self.obj = obj
        self.outer_unpack = outer_unpack


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _dense_permuted(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (a permutation of a contiguous layout)."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.dim()), key=lambda i: t.stride(i))
    expected = 1
    for i in order:
        if t.shape[i] != 1 and t.stride(i) != expected:
            return False
        expected *= t.shape[i]
    return True


def skip_reason(t: torch.Tensor, cfg: QuantConfig, scope: StepScope) -> str | None:
    """Why a saved tensor is kept as it is, or None if it is quantized."""
    if t.dtype not in _FLOATS:
        return "non_float"
    if t.layout != torch.strided or t.numel() == 0:
        return "layout"
    if _hint(t.numel()) * t.element_size() < cfg.min_bytes:
        return "tiny"
    if storage_key(t) in scope.excluded or (t.is_leaf and t.requires_grad):
        return "parameter_buffer_or_input"
    if not _dense_permuted(t):
        return "overlapping_or_strided"
    return None


def share_key(t: torch.Tensor) -> tuple:
    """Within one storage, saves with this key are the same tensor (quantized once)."""
    k = _hashable
    if t.is_contiguous():
        # Contiguous views of the same elements in the same order (softmax saves (B, H, T, T),
        # the next bmm its (B*H, T, T) reshape) share one packed copy.
        return (k(t.storage_offset()), k(t.numel()), t.dtype, t._version)
    return (k(t.storage_offset()), tuple(map(k, t.shape)), tuple(map(k, t.stride())), t.dtype, t._version)


def _hashable(v):
    return str(v.node.expr) if isinstance(v, torch.SymInt) else v


class QuantizedSaves:
    """Context manager: quantize what autograd saves inside it (see the module doc).

    `name`: slot prefix for running ranges. `heads`: number of attention heads if the region
    computes attention (head-wise ranges), else None. `scope`: the step's StepScope (storages
    to skip, quantized storages to share); a private one is made if None, from `exclude`.
    """

    def __init__(self, config: QuantConfig | None = None, *, state: QuantState | None = None,
                 scope: StepScope | None = None, exclude: Iterable[torch.Tensor] = (),
                 name: str = "", heads: int | None = None):
        self.config = config or (state.config if state is not None else QuantConfig())
        self.state = state if state is not None else QuantState(self.config)
        self.scope = scope if scope is not None else StepScope(exclude)
        self.name = name
        self.heads = heads
        self._outer = None
        self._count = 0

    def __enter__(self):
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)  # noqa: SLF001
        self._outer = tuple(top) if top is not None else None
        self._count = 0
        torch._C._autograd._push_saved_tensors_default_hooks(self._pack, _unpack)  # noqa: SLF001
        return self

    def __exit__(self, *exc):
        torch._C._autograd._pop_saved_tensors_default_hooks()  # noqa: SLF001
        return False

    # -- hooks

    def _keep(self, t: torch.Tensor, reason: str | None):
        if reason is not None:
            self.state.stats.skip(reason)
        if self._outer is not None:
            return _Kept(self._outer[0](t), self._outer[1])
        return _Kept(t.detach(), None)

    def _pack(self, t: torch.Tensor):
        slot = (self.name, self._count)
        self._count += 1
        reason = skip_reason(t, self.config, self.scope)
        if reason is not None:
            return self._keep(t, reason)
        st = t.untyped_storage()
        key = share_key(t)
        per_storage = self.scope.cache.get(st)
        if per_storage is not None and key in per_storage:
            self.state.stats.shared += 1
            hit = per_storage[key]
            return hit if tuple(t.shape) == hit.shape else _View(hit, tuple(t.shape))
        packed = self._quantize(t, slot)
        self.scope.cache.setdefault(st, {})[key] = packed
        return packed

    def _layout(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(ch_div, n_ch) for head-wise ranges of t, or None."""
        H = self.heads
        if not (self.config.headwise and H):
            return None
        if t.dim() == 4 and t.shape[1] == H:
            return t.numel() // (t.shape[0] * H), H
        if t.dim() == 3 and t.shape[0] % H == 0:
            return t.shape[1] * t.shape[2], H
        return None

    def _quantize(self, t: torch.Tensor, slot) -> _Packed:
        cfg = self.config
        fake = _is_fake(t)
        x = t.detach().contiguous()
        layout = self._layout(x)
        if layout is None and cfg.ema:
            layout = (x.numel(), 1)   # per-tensor running range (Mesa's layer-wise ranges)
        qmax = (1 << cfg.bits) - 1
        kw: dict[str, Any] = {}
        if layout is not None:
            ch_div, n_ch = layout
            lo, hi = reference.channel_minmax(x, ch_div, n_ch)
            if cfg.ema and not fake:
                lo, hi = self._update_ema(slot, lo, hi)
            scale, zero = reference.scale_zero(lo, hi, qmax)
            kw = dict(scale=scale, zero=zero, ch_div=ch_div)
        # On FakeTensors (analyze_step) no seed is drawn: the generator is left as the real
        # steps will find it, and a draw would be a data-dependent value there.
        seed = reference.draw_seed(self.state.generator) if cfg.stochastic and not fake else 0
        codes, flags, scale, zero = dispatch.quantize(x, cfg.bits, cfg.group_size, stochastic=cfg.stochastic,
                                                      seed=seed, **kw)
        p = _Packed()
        parts = [codes, flags, scale, zero]
        p.outer_unpack = None
        if self._outer is not None:
            parts = [self._outer[0](q) for q in parts]
            p.outer_unpack = self._outer[1]
        p.parts = parts
        p.shape = tuple(t.shape)
        p.stride = None if t.is_contiguous() else tuple(t.stride())
        p.dtype = t.dtype
        p.bits = cfg.bits
        p.group_size = cfg.group_size
        p.per_row = layout is None
        p.ch_div = layout[0] if layout is not None else 1
        st = self.state.stats
        st.quantized += 1
        st.bytes_in += _hint(t.numel()) * t.element_size()
        st.bytes_out += sum(_hint(q.numel()) * q.element_size() for q in (codes, flags, scale, zero))
        return p

    def _update_ema(self, slot, lo, hi):
        prev = self.state.ema.get(slot)
        fin_lo, fin_hi = torch.isfinite(lo), torch.isfinite(hi)
        if prev is None or prev[0].shape != lo.shape or prev[0].device != lo.device:
            new = (lo.clone(), hi.clone())
        else:
            m = self.config.momentum
            # A head with no finite value this step keeps its running range.
            new = (torch.where(fin_lo, m * prev[0] + (1 - m) * lo, prev[0]),
                   torch.where(fin_hi, m * prev[1] + (1 - m) * hi, prev[1]))
        self.state.ema[slot] = new
        return new


def _hint(v) -> int:
    if isinstance(v, torch.SymInt):
        n = v.node
        return int(n.hint if n.hint is not None else n.shape_env.size_hint(n.expr))
    return int(v)


def _unpack(obj) -> torch.Tensor:
    if isinstance(obj, _Kept):
        return obj.outer_unpack(obj.obj) if obj.outer_unpack is not None else obj.obj
    return obj.dequantize()


def quantized_saves(model: torch.nn.Module | None = None, config: QuantConfig | None = None, *,
                    inputs: Iterable[torch.Tensor] = (), state: QuantState | None = None,
                    heads: int | None = None, name: str = "") -> QuantizedSaves:
    """Eager use: `with quantized_saves(model, inputs=(x,)): loss = model(x).sum()`.

    The parameters and buffers of `model` and the tensors in `inputs` are never quantized.
    Pass the same `state` every step to keep running ranges.
    """
    exclude = list(inputs)
    if model is not None:
        exclude += list(model.parameters()) + list(model.buffers())
    return QuantizedSaves(config, state=state, exclude=exclude, name=name, heads=heads)


def quantized_nbytes(shape, dtype: torch.dtype, config: QuantConfig, heads: int | None = None) -> int:
    """Bytes stored for a saved tensor of `shape` and `dtype` (0 if it would be kept as is
    because of its dtype or size); matches what `QuantizedSaves` allocates."""
    numel = math.prod(shape)
    elem = torch.empty((), dtype=dtype).element_size()
    if dtype not in _FLOATS or numel * elem < config.min_bytes or numel == 0:
        return numel * elem
    n_ch = None
    if config.headwise and heads:
        if (len(shape) == 4 and shape[1] == heads) or (len(shape) == 3 and shape[0] % heads == 0):
            n_ch = heads
    if n_ch is None and config.ema:
        n_ch = 1
    return reference.packed_bytes(numel, config.bits, config.group_size, n_ch)
