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
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


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

    def __init__(self, shape_env, fake_mode=None):
        super().__init__()
        self.shape_env = shape_env
        self.fake_mode = fake_mode
        self.stores: list[_Store] = []
        self.events: list[tuple[int, _Store, str]] = []   # (+1 alloc / -1 free, store, phase)
        self.by_storage: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self._refs: list[weakref.ref] = []
        self.phase = "start"
        self.node: str | None = None
        self.flops_expr: Any = 0
        self.node_flops: dict[str, int] = {}
        from torch.utils.flop_counter import flop_registry
        self._flop_registry = flop_registry

    def register(self, t: torch.Tensor, category: str | None = None) -> _Store | None:
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

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.fake_mode is not None:
            # A real tensor reaching an operator was made before the step (labels a loss
            # closes over): fake mode converts it, memoized; count its storage as an input
            # rather than as an allocation of this operator.
            for t in pytree.tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and not _is_fake(t):
                    self.register(self.fake_mode.fake_tensor_converter.from_real_tensor(self.fake_mode, t), "inputs")
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", None)
        if packet in self._flop_registry and self.phase == "forward" and self.node is not None:
            try:
                f = self._flop_registry[packet](*args, **kwargs, out_val=out)
                _, fh = _expr_and_hint(f)
                self.node_flops[self.node] = self.node_flops.get(self.node, 0) + fh
            except Exception:  # noqa: BLE001 - FLOPs are an estimate; never fail the step
                pass
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.register(t)
        scratch = _kernel_scratch_bytes(func, args, out, kwargs)
        if scratch:
            # Scratch lives while the kernel runs, beside its outputs, then goes.
            s = _Store(nbytes=scratch, expr=sympy.Integer(scratch), phase=self.phase,
                       node=self.node, category="transient")
            self.stores.append(s)
            self.events.append((1, s, self.phase))
            self.events.append((-1, s, self.phase))
        return out


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
