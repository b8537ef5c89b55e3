"""The dispatch mode behind the memory cost model: each operator's new output storages and,
through a weak reference on each, their release (eager PyTorch's reference counting, exactly);
plus the scratch memory known to live inside some kernels.

Used by memfit.cost_models.memory.analyze_step on top of FakeTensorMode: storages are fake,
so sizes are exact and nothing is allocated.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch._refs
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from memfit.runtime.checkpoint import saved_operators


@dataclass
class _Store:
    """One storage (allocation) seen during the simulated step."""

    nbytes: int
    expr: Any
    phase: str
    node: str | None
    category: str | None = None     # fixed at the start for pre-existing storages
    saved: bool = False
    freed_at: int | None = None


class _Tracker(TorchDispatchMode):
    """Records each operator's new output storages and (via weakref) their release."""

    def __init__(self, shape_env, fake_mode=None, device: torch.device | None = None):
        super().__init__()
        # the device whose memory the step's budget means; storages elsewhere (host copies of
        # offloaded activations, RNG states on a GPU step) are not counted
        self.device = device
        self.shape_env = shape_env
        self.fake_mode = fake_mode
        self.stores: list[_Store] = []
        self.events: list[tuple[int, _Store, str]] = []   # (+1 alloc / -1 free, store, phase)
        self.by_storage: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._refs: list[weakref.ref] = []
        self.phase = "start"
        self.engine_window = False      # between an autograd node's end and the next's start
        self.use_counts: list | None = None   # set while calibrating (_sole_owner_counts)
        self.node: str | None = None
        self.fx_node: torch.fx.Node | None = None    # the graph node running, for errors
        self.specialized: dict = {}     # shape symbol -> (operator, node) whose guard fixed it
        self.flops_expr: Any = 0
        self.node_flops: dict[str, int] = {}
        self.node_kept: dict[str, int] = {}   # bytes of SAVED_OPERATORS' outputs per node (forward)
        from torch.utils.flop_counter import flop_registry
        self._flop_registry = flop_registry

    def register(self, t: torch.Tensor, category: str | None = None) -> _Store | None:
        if self.device is not None and t.device.type != self.device.type:
            return None
        if t.layout == torch.sparse_coo:   # no storage of its own: its indices and values have them
            stores = [self.register(part, category) for part in (t._indices(), t._values())]
            return stores[-1]
        st = t.untyped_storage()
        s = self.by_storage.get(st)
        if s is not None:
            return s
        nb = st.nbytes()
        expr, hint = _expr_and_hint(nb)
        s = _Store(nbytes=hint, expr=expr, phase=self.phase, node=self.node, category=category)
        self.by_storage[st] = s
        self.stores.append(s)
        self.events.append((1, s, self.phase))
        self._refs.append(weakref.ref(st, self._make_free(s)))
        return s

    def _make_free(self, s: _Store):
        def _free(_ref):
            s.freed_at = len(self.events)
            self.events.append((-1, s, self.phase))
        return _free

    def watch_backward(self, loss: torch.Tensor) -> list:
        """Hooks on every node of `loss`'s autograd graph marking the engine's own work between
        nodes (adding gradient contributions: `_accumulates_in_place`); returns their handles."""
        handles, seen, stack = [], set(), [loss.grad_fn]

        def ended(*_):
            self.engine_window = True

        def started(*_):
            self.engine_window = False

        while stack:
            n = stack.pop()
            if n is None or n in seen:
                continue
            seen.add(n)
            handles += [n.register_hook(ended), n.register_prehook(started)]
            stack.extend(f for f, _ in n.next_functions)
        return handles

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.engine_window and func is _aten.add.Tensor:
            if self.use_counts is not None:
                self.use_counts.append(_use_counts(args[0]))
            elif _accumulates_in_place(args, kwargs):
                return _aten.add_.Tensor(args[0], args[1])
        if self.fake_mode is not None:
            # A real tensor reaching an operator was made before the step (labels a loss
            # closes over): fake mode converts it, memoized; count its storage as an input
            # rather than as an allocation of this operator.
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and not _is_fake(t):
                    self.register(self.fake_mode.fake_tensor_converter.from_real_tensor(self.fake_mode, t), "inputs")
        _check_dtypes(func, args, self.fx_node)
        se = self.shape_env
        known = len(se.replacements) if se is not None else 0
        ref = _SYMBOLIC_REFS.get(func)
        if ref is not None and se is not None and _has_symbolic_size(args):
            out = ref(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        if se is not None and len(se.replacements) > known:
            for sym, val in list(se.replacements.items())[known:]:
                if getattr(val, "is_number", False):
                    self.specialized.setdefault(sym, (func, self.fx_node))
        packet = getattr(func, "_overloadpacket", None)
        if packet in self._flop_registry and self.phase == "forward" and self.node is not None:
            try:
                f = self._flop_registry[packet](*args, **kwargs, out_val=out)
                _, fh = _expr_and_hint(f)
                self.node_flops[self.node] = self.node_flops.get(self.node, 0) + fh
            except Exception:  # noqa: BLE001 - FLOPs are an estimate; never fail the step
                pass
        kept = self.phase == "forward" and self.node is not None and func in saved_operators()
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                new = kept and t.untyped_storage() not in self.by_storage
                s = self.register(t)
                if new and s is not None:
                    self.node_kept[self.node] = self.node_kept.get(self.node, 0) + s.nbytes
        scratch = _kernel_scratch_bytes(func, args, out, kwargs)
        if scratch:
            # Scratch lives while the kernel runs, beside its outputs, then goes.
            s = _Store(nbytes=scratch, expr=sympy.Integer(scratch), phase=self.phase,
                       node=self.node, category="transient")
            self.stores.append(s)
            self.events.append((1, s, self.phase))
            self.events.append((-1, s, self.phase))
        return out


_aten = torch.ops.aten


# Eager's autograd engine adds a second gradient contribution into the first in place when it
# holds the only reference to the first and to its storage (InputBuffer::accumulate), but never
# when a tensor subclass or a dispatch mode is involved, which is always the case here: every
# sum would then hold one more buffer than eager's. The engine's adds are told from the
# derivatives' own by hooks on the graph (watch_backward); the reference counts that mean
# "only the engine holds it", as seen from inside __torch_dispatch__, are measured once
# (_sole_owner_counts) on a sum whose first part nothing else holds.
def _use_counts(t: torch.Tensor) -> tuple[int, int]:
    return t._use_count(), torch._C._storage_Use_Count(t.untyped_storage()._cdata)  # noqa: SLF001


def _accumulates_in_place(args, kwargs) -> bool:
    if kwargs or len(args) != 2 or torch.is_grad_enabled():
        return False
    old, new = args
    if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)):
        return False
    if old.layout != torch.strided or old.is_nested or old.dtype != new.dtype or not _same_shape(old, new):
        return False
    # eager's rule: non-overlapping and dense (a permuted layout too); decided without adding
    # guards on symbolic sizes (unknown: not in place, which errs high)
    from torch._prims_common import is_non_overlapping_and_dense_or_false
    return is_non_overlapping_and_dense_or_false(old) and _use_counts(old) == _sole_owner_counts()


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    def key(d):
        return str(d.node.expr) if isinstance(d, torch.SymInt) else int(d)
    return a.dim() == b.dim() and all(key(x) == key(y) for x, y in zip(a.shape, b.shape))


_SOLE: list = []


def _sole_owner_counts() -> tuple[int, int] | None:
    if not _SOLE:
        from torch._subclasses.fake_tensor import FakeTensorMode

        fm = FakeTensorMode()
        t = _Tracker(None, fm)
        t.use_counts = []
        with fm:
            x = torch.empty(8, requires_grad=True)
            y = x * 2
            loss = (y.sin() + y.cos()).sum()     # y's gradient: cos(y) * g, then + (-sin(y) * g)
        handles = t.watch_backward(loss)
        with fm, t:
            loss.backward()
        for h in handles:
            h.remove()
        _SOLE.append(t.use_counts[0] if len(t.use_counts) == 1 else None)
    return _SOLE[0]
# Operators whose eager kernels need all their tensor arguments in one dtype, which their meta
# kernels (FakeTensor's, so the whole simulated step) do not check: an int64 batch into a
# Linear would be planned while eager raises "mat1 and mat2 must have the same dtype".
_ONE_DTYPE = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
              _aten.addbmm.default, _aten.mv.default, _aten.addmv.default, _aten.dot.default,
              _aten.convolution.default}


# Operators whose kernels read sizes as plain ints (specializing a symbolic batch or sequence
# length to its example value) where a reference implementation of the same allocations keeps
# them symbolic: constant_pad_nd (Hugging Face's causal-LM loss pads the labels) allocates its
# output, fills it and copies the input in, as eager's kernel does.
_SYMBOLIC_REFS = {_aten.constant_pad_nd.default: torch._refs.constant_pad_nd}


def _has_symbolic_size(args) -> bool:
    return any(isinstance(a, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in a.shape)
               for a in pytree.tree_leaves(args))


def _check_dtypes(func, args, node) -> None:
    if func not in _ONE_DTYPE:
        return
    dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor)]
    if len(set(dtypes)) > 1:
        from memfit.errors import CaptureError
        from memfit.ir.fx_utils import module_path
        path = module_path(node) if node is not None else ""
        where = "the loss" if node is None else (f"module {path!r} (node {node.name})" if path else f"node {node.name}")
        names = " and ".join(str(d).replace("torch.", "") for d in dict.fromkeys(dtypes))
        raise CaptureError(
            f"the step does not run in eager PyTorch: {func.name()} in {where} gets tensors of "
            f"{names}, and its kernels need one dtype (eager raises a dtype error there). "
            f"Give the model inputs of its parameters' dtype (for example x.float()), or convert them in forward.")


def _kernel_scratch_bytes(func, args, out, kwargs=None) -> int:
    """Bytes a kernel allocates and frees inside itself (0 where none was measured).

    Such scratch depends on the CPU or GPU, the thread count and the kernel library
    (oneDNN reorders and per-thread buffers, cuDNN workspaces), so it is measured by
    running the real operator once at these shapes (memfit/cost_models/probes.py), cached.
    """
    from memfit.cost_models import probes

    return probes.kernel_scratch_bytes(func, args, kwargs, out)


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def _expr_and_hint(v) -> tuple[Any, int]:
    if isinstance(v, torch.SymInt):
        node = v.node
        hint = node.hint if node.hint is not None else node.shape_env.size_hint(node.expr)
        return node.expr, int(hint)
    return sympy.Integer(int(v)), int(v)
