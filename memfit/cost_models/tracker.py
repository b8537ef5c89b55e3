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

    def __init__(self, shape_env):
        super().__init__()
        self.shape_env = shape_env
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
        scratch = _kernel_scratch_bytes(func, args, out)
        if scratch:
            # Scratch lives while the kernel runs, beside its outputs, then goes.
            s = _Store(nbytes=scratch, expr=sympy.Integer(scratch), phase=self.phase,
                       node=self.node, category="transient")
            self.stores.append(s)
            self.events.append((1, s, self.phase))
            self.events.append((-1, s, self.phase))
        return out


def _kernel_scratch_bytes(func, args, out) -> int:
    """Bytes a kernel allocates and frees inside itself, where we know them.

    CPU convolutions (oneDNN) reorder activations and weights into blocked layouts in
    temporary buffers. Measured with the profiler's allocation events on torch 2.13 CPU
    (3x3 and 1x1 convs, 3-64 channels, 16x16 and 32x32 images): forward scratch was the
    output bytes plus the weight bytes (within 1% on 3 of 5 shapes, up to +14% on a 7x7
    kernel), backward scratch the input + grad_output + weight bytes (within 2% on 3 of 5;
    -35% on a 3-channel stem, +49% on a 7x7 kernel), except for kernels larger than their
    input (below). CUDA scratch (cuDNN workspaces) is not modelled.
    """
    packet = getattr(func, "_overloadpacket", None)
    if packet is torch.ops.aten.convolution:
        x, w = args[0], args[1]
        if x.device.type != "cpu" or not isinstance(out, torch.Tensor):
            return 0
        return _expr_and_hint(out.numel())[1] * out.element_size() + _expr_and_hint(w.numel())[1] * w.element_size()
    if packet is torch.ops.aten.convolution_backward:
        g, x, w = args[0], args[1], args[2]
        if x.device.type != "cpu":
            return 0
        nbytes = [_expr_and_hint(t.numel())[1] * t.element_size() for t in (g, x, w)]
        spatial = [_expr_and_hint(s)[1] for s in x.shape[2:]]
        kernel = [_expr_and_hint(s)[1] for s in w.shape[2:]]
        if any(s < k for s, k in zip(spatial, kernel)):
            # A kernel larger than its input (3x3 on 2x2 or 1x1 maps, the last stage of a
            # ResNet on small images): oneDNN's weight-gradient then keeps 4 weight-sized
            # buffers per thread. Measured on torch 2.13 CPU, 64-512 channels, B=4-16:
            # 4.00-4.02 x weight bytes at 1 thread, 8.00-8.13 x at 2 threads.
            return nbytes[0] + nbytes[1] + 4 * torch.get_num_threads() * nbytes[2]
        return sum(nbytes)
    return 0


def _expr_and_hint(v) -> tuple[Any, int]:
    if isinstance(v, torch.SymInt):
        node = v.node
        hint = node.hint if node.hint is not None else node.shape_env.size_hint(node.expr)
        return node.expr, int(hint)
    return sympy.Integer(int(v)), int(v)
