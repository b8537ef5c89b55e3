"""Pass `quantize-activations`: store chosen saved activations in 8/4/2 bits (Mesa).

The pass finds the graph nodes whose operators save float activations for backward (a
FakeTensor run of the forward with a recording saved-tensor hook per node), and turns each
chosen node into a call of a `QuantizedCall` module under `gm.memfit_quant`, which runs the
original operator inside `memfit.runtime.quantized_save.QuantizedSaves`. A first node
`memfit_quant(*inputs)` opens the step's scope (the storages of inputs, parameters and buffers,
never quantized; the storages already quantized this step) and every wrapped node takes it
as its first argument, so the order is a data dependency and dead-code elimination keeps it.

Attention nodes (matmul, bmm, softmax and scaled-dot-product attention with a 4-D (B, H, T, *)
output) get head-wise ranges. The wrapper modules hold no parameters or buffers: the graph
module's state_dict keys are unchanged.

`price_candidates` gives the planner, per saved tensor: bytes saved and predicted time.
"""

from __future__ import annotations

import dataclasses
import operator
import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
import torch.utils._pytree as pytree

from memfit.errors import PassError
from memfit.ir.fx_utils import size_hint
from memfit.passes.infra.base import Diagnostic, Pass, PassContext, PassResult, Promise
from memfit.passes.infra.registry import register_pass
from memfit.planning.quantize import quant_time_s
from memfit.runtime.quantized_save import (QuantConfig, QuantizedSaves, QuantState, StepScope,
                                           quantized_nbytes, share_key, skip_reason, storage_key)

RUNTIME_ATTR = "memfit_quant"

_ATTN_NAMES = {"matmul", "bmm", "baddbmm", "softmax", "_softmax", "log_softmax", "_log_softmax",
               "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_cudnn_attention"}
# Nodes that never save anything worth wrapping (views, getitem, shape arithmetic).
_SKIP_FUNCS = {operator.getitem, getattr}


# ----------------------------------------------------------------------------- runtime modules

class QuantRuntime(torch.nn.Module):
    """`gm.memfit_quant`: the state shared by the wrapped nodes (no parameters, no buffers).

    Called once per forward with the graph's inputs; returns the step's StepScope.
    """

    _is_impure = True  # keep the scope node under dead-code elimination

    def __init__(self, config: QuantConfig, owner: torch.fx.GraphModule):
        super().__init__()
        self.config = config
        self.state = QuantState(config)
        object.__setattr__(self, "_owner", weakref.ref(owner))

    def forward(self, *inputs):
        owner = self._owner()
        exclude = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
        if owner is not None:
            exclude += list(owner.parameters()) + list(owner.buffers())
        return StepScope(exclude)

    def extra_repr(self) -> str:
        c = self.config
        return f"bits={c.bits}, group_size={c.group_size}, headwise={c.headwise}, ema={c.ema}"


class QuantizedCall(torch.nn.Module):
    """One wrapped node: runs the original call inside QuantizedSaves."""

    def __init__(self, runtime: QuantRuntime, kind: str, target, name: str, heads: int | None):
        super().__init__()
        object.__setattr__(self, "_runtime", runtime)  # not a child: no duplicate registration
        self.kind = kind
        self.target = target
        self.node_name = name
        self.heads = heads

    def forward(self, scope, *args, **kwargs):
        rt = self._runtime
        with QuantizedSaves(rt.config, state=rt.state, scope=scope, name=self.node_name, heads=self.heads):
            if self.kind == "call_function":
                return self.target(*args, **kwargs)
            if self.kind == "call_method":
                return getattr(args[0], self.target)(*args[1:], **kwargs)
            owner = rt._owner()
            return owner.get_submodule(self.target)(*args, **kwargs)

    def extra_repr(self) -> str:
        t = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", str(self.target))
        return f"{self.kind} {t}" + (f", heads={self.heads}" if self.heads else "")


# ----------------------------------------------------------------------------- analysis

@dataclass(frozen=True)
class SavedTensorInfo:
    """One tensor a node saves for backward, seen on FakeTensors."""

    node: str
    index: int                 # order of the save within the node
    shape: tuple
    dtype: torch.dtype
    nbytes: int
    skip: str | None           # why it would be kept as is (None: quantized)
    shared_with: str | None    # first node that saved the same storage view this step


@dataclass(frozen=True)
class QuantCandidate:
    """Pricing of one quantizable saved tensor for a budget solver (bytes, seconds)."""

    node: str
    index: int
    shape: tuple
    dtype: str
    nbytes: int
    packed_bytes: int
    bytes_saved: int
    time_cost_s: float
    headwise: bool

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _heads_of(n: torch.fx.Node) -> int | None:
    """Number of heads if `n` is an attention node with a 4-D (B, H, T, *) output."""
    t = n.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if hasattr(t, "_overloadpacket"):
        name = t._overloadpacket.__name__
    if name not in _ATTN_NAMES:
        return None
    val = n.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0] if val else None
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    return size_hint(val.shape[1])


def saved_tensors_by_node(gm: torch.fx.GraphModule, ctx: PassContext | None,
                          config: QuantConfig) -> dict[str, list[SavedTensorInfo]]:
    """Per node, the tensors autograd saves in the forward of `gm` on FakeTensors: the cost
    model's saved-tensor probe (memfit.cost_models.memory.analyze_step, forward only), with the
    runtime's gate (skip_reason) deciding what would be kept as is."""
    import dataclasses as _dc

    from memfit.cost_models.memory import analyze_step

    if ctx is None or ctx.captured is None:
        raise PassError("quantize-activations needs the captured model in the PassContext (its example inputs)")
    seen: dict[tuple, str] = {}
    out: dict[str, list[SavedTensorInfo]] = {}

    def on_save(node: str, t: torch.Tensor, preexisting: bool) -> None:
        scope = StepScope()
        if preexisting:   # parameters, buffers, inputs: never quantized
            scope.excluded.add(storage_key(t))
        reason = skip_reason(t, config, scope)
        key = (storage_key(t), share_key(t))
        shared = seen.get(key) if reason is None else None
        if reason is None and shared is None:
            seen[key] = node
        recs = out.setdefault(node, [])
        shape = tuple(size_hint(d) for d in t.shape)
        recs.append(SavedTensorInfo(node, len(recs), shape, t.dtype, size_hint(t.numel()) * t.element_size(),
                                    reason, shared))

    analyze_step(_dc.replace(ctx.captured, gm=gm), symbolic=False, on_save=on_save, forward_only=True)
    return out


def price_candidates(gm: torch.fx.GraphModule, ctx: PassContext | None = None,
                     config: QuantConfig | None = None, *, bytes_per_s: float | None = None,
                     saved: dict[str, list[SavedTensorInfo]] | None = None) -> list[QuantCandidate]:
    """Per quantizable saved tensor: bytes saved and predicted extra time.

    Time: memfit.planning.quantize.quant_time_s (the one pricing, shared with the backend) at
    `bytes_per_s` (DeviceSpec's nominal bandwidth) and the kernels' traffic factor
    (memfit.kernels.dispatch.traffic_factor: 1 for Triton, about 30 for the CPU reference).
    """
    from memfit.cost_models.memory import DeviceSpec

    from memfit.kernels.dispatch import traffic_factor

    config = config or QuantConfig()
    dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
    if bytes_per_s is None:
        bytes_per_s = DeviceSpec.for_device(dev).bytes_per_s
    factor = traffic_factor(dev)   # the CPU reference kernels make many passes
    saved = saved if saved is not None else saved_tensors_by_node(gm, ctx, config)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for name, recs in saved.items():
        heads = _heads_of(nodes[name]) if name in nodes else None
        for r in recs:
            if r.skip is not None or r.shared_with is not None:
                continue
            packed = quantized_nbytes(r.shape, r.dtype, config, heads)
            channel = bool((config.headwise and heads) or config.ema)
            hw = bool(config.headwise and heads and packed and _head_layout(r.shape, heads))
            secs = quant_time_s(r.nbytes, packed, bytes_per_s=bytes_per_s, factor=factor, extra_read=channel)
            out.append(QuantCandidate(name, r.index, r.shape, str(r.dtype).replace("torch.", ""), r.nbytes,
                                      packed, r.nbytes - packed, secs, hw))
    return out


def _head_layout(shape, heads) -> bool:
    return (len(shape) == 4 and shape[1] == heads) or (len(shape) == 3 and shape[0] % heads == 0)


# ----------------------------------------------------------------------------- the pass

@register_pass
@dataclass(frozen=True)
class QuantizeActivations(Pass):
    """Store saved activations in `bits` bits (8 default; 4 and 2 bit-packed).

    Options: group_size (elements per row of codes), headwise (one range per head for
    attention tensors), ema (running ranges, as Mesa; false: per-step ranges), stochastic
    (unbiased rounding, seeded by `seed`), min_bytes (smaller saved tensors kept), nodes
    (only these node names; empty: every node that saves a quantizable tensor).
    """

    name: ClassVar[str] = "quantize-activations"
    promise: ClassVar[Promise] = Promise("approximate", cosine=0.99)

    bits: int = 8
    group_size: int = 256
    headwise: bool = True
    ema: bool = False
    stochastic: bool = False
    min_bytes: int = 4096
    seed: int = 0
    nodes: tuple[str, ...] = ()

    def __post_init__(self):
        self.config()  # validates (ValueError -> PassError in from_options)

    def price(self, gm: torch.fx.GraphModule, ctx: PassContext) -> list[QuantCandidate]:
        """The candidates this pass would quantize in `gm`, priced (price_candidates)."""
        return price_candidates(gm, ctx, self.config())

    def config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, headwise=self.headwise, ema=self.ema,
                           stochastic=self.stochastic, seed=self.seed, min_bytes=self.min_bytes)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if hasattr(gm, RUNTIME_ATTR):
            return PassResult(gm, False, {"nodes": 0, "tensors": 0},
                              [Diagnostic(self.name, "graph already quantized; left as is", level="warning")])
        cfg = self.config()
        saved = saved_tensors_by_node(gm, ctx, cfg)
        diags: list[Diagnostic] = []
        wanted = set(self.nodes)
        names = {n.name for n in gm.graph.nodes}
        for w in sorted(wanted - names):
            diags.append(Diagnostic(self.name, f"no node named {w!r}", level="warning"))
        # A storage saved by several nodes is freed only if every one of them stores the
        # quantized copy: choosing one node chooses all nodes that share its saves.
        groups: dict[str, set[str]] = {}
        for recs in saved.values():
            for r in recs:
                if r.skip is None and r.shared_with is not None:
                    groups.setdefault(r.shared_with, {r.shared_with}).add(r.node)
        if wanted:
            closure = set(wanted)
            for first, members in groups.items():
                if members & wanted:
                    closure |= members
            for extra in sorted(closure - wanted):
                diags.append(Diagnostic(self.name, "also wrapped: it saves a storage a chosen node saves",
                                        node=extra))
            wanted = closure
        chosen = []
        tensors = headwise_tensors = 0
        for n in gm.graph.nodes:
            recs = saved.get(n.name)
            if not recs or (wanted and n.name not in wanted):
                continue
            if n.op == "call_function" and n.target in _SKIP_FUNCS:
                continue
            todo = [r for r in recs if r.skip is None]
            skipped = [r for r in recs if r.skip is not None]
            if skipped:
                why = ", ".join(sorted({r.skip for r in skipped}))
                diags.append(Diagnostic(self.name, f"{len(skipped)} saved tensor(s) kept as is ({why})", node=n.name))
            if not todo:
                continue
            heads = _heads_of(n) if cfg.headwise else None
            chosen.append((n, heads))
            unique = [r for r in todo if r.shared_with is None]
            tensors += len(unique)
            if heads:
                headwise_tensors += sum(1 for r in unique if _head_layout(r.shape, heads))
        if not chosen:
            return PassResult(gm, False, {"nodes": 0, "tensors": 0, "headwise_tensors": 0}, diags)

        chosen_names = {n.name for n, _ in chosen}
        priced = [c for c in price_candidates(gm, ctx, cfg, saved=saved) if c.node in chosen_names]
        extra_time_us = int(round(sum(c.time_cost_s for c in priced) * 1e6))
        bytes_saved = sum(c.bytes_saved for c in priced)
        runtime = QuantRuntime(cfg, gm)
        gm.add_submodule(RUNTIME_ATTR, runtime)
        g = gm.graph
        placeholders = [n for n in g.nodes if n.op == "placeholder"]
        anchor = placeholders[-1] if placeholders else next(iter(g.nodes))
        with g.inserting_after(anchor):
            scope_node = g.call_module(RUNTIME_ATTR, tuple(placeholders))
        scope_node.name = "memfit_quant_scope"
        for n, heads in chosen:
            sub = _safe(n.name)
            runtime.add_module(sub, QuantizedCall(runtime, n.op, n.target, n.name, heads))
            n.op = "call_module"
            n.target = f"{RUNTIME_ATTR}.{sub}"
            n.args = (scope_node, *n.args)
            n.meta["memfit_quant"] = {"bits": cfg.bits, "heads": heads}
        gm.recompile()
        # extra_time_us / bytes_saved: the planner's pricing (price_candidates) of what was chosen.
        return PassResult(gm, True, {"nodes": len(chosen), "tensors": tensors,
                                     "headwise_tensors": headwise_tensors, "extra_time_us": extra_time_us,
                                     "bytes_saved": bytes_saved}, diags)


def _safe(name: str) -> str:
    return name.replace(".", "_")


def quantize_stats(gm: torch.fx.GraphModule):
    """The running counters (QuantStats) of a graph rewritten by the pass, or None."""
    rt = getattr(gm, RUNTIME_ATTR, None)
    return rt.state.stats if rt is not None else None
