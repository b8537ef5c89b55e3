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
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from memfit.errors import PassError
from memfit.ir.fx_utils import size_hint
from memfit.passes.infra.base import Diagnostic, Pass, PassContext, PassResult, Promise
from memfit.passes.infra.registry import register_pass
from memfit.passes.infra.saved_hooks import HookedCall, HookedRuntime, wrap_nodes
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

class QuantRuntime(HookedRuntime):
    """`gm.memfit_quant`: the state shared by the wrapped nodes (no parameters, no buffers).

    Called once per forward with the graph's inputs; returns the step's StepScope.
    """

    def __init__(self, config: QuantConfig, owner: torch.fx.GraphModule):
        super().__init__(owner)
        self.config = config
        self.state = QuantState(config)

    def scope(self, exclude: list) -> StepScope:
        return StepScope(exclude)

    def extra_repr(self) -> str:
        c = self.config
        return f"bits={c.bits}, group_size={c.group_size}, headwise={c.headwise}, ema={c.ema}"


class QuantizedCall(HookedCall):
    """One wrapped node: runs the original call inside QuantizedSaves."""

    def __init__(self, runtime: QuantRuntime, kind: str, target, name: str, heads: int | None):
        super().__init__(runtime, kind, target, name)
        self.heads = heads

    def hooks(self, scope):
        rt = self._runtime
        return QuantizedSaves(rt.config, state=rt.state, scope=scope, name=self.node_name, heads=self.heads)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", heads={self.heads}" if self.heads else "")


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
                          config: QuantConfig | None = None, gate=None) -> dict[str, list[SavedTensorInfo]]:
    """Per node, the tensors autograd saves in the forward of `gm` on FakeTensors: the cost
    model's saved-tensor probe (memfit.cost_models.memory.analyze_step, forward only), with a
    runtime's gate deciding what would be kept as is: `gate(t, preexisting)` -> reason or None,
    by default quantization's (skip_reason with `config`)."""
    import dataclasses as _dc

    from memfit.cost_models.memory import analyze_step

    if ctx is None or ctx.captured is None:
        raise PassError("quantize-activations needs the captured model in the PassContext (its example inputs)")
    seen: dict[tuple, str] = {}
    out: dict[str, list[SavedTensorInfo]] = {}

    if gate is None:
        def gate(t, preexisting):
            scope = StepScope()
            if preexisting:   # parameters, buffers, inputs: never quantized
                scope.excluded.add(storage_key(t))
            return skip_reason(t, config, scope)

    def on_save(node: str, t: torch.Tensor, preexisting: bool) -> None:
        reason = gate(t, preexisting)
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


def choose_nodes(gm: torch.fx.GraphModule, saved: dict[str, list[SavedTensorInfo]], nodes, pass_name: str):
    """The nodes a saved-tensor pass wraps: every node with a save its gate accepts, or only
    `nodes` (by name) and the nodes saving the same storages as they do (a storage saved by
    several nodes is freed only if each of them stores the new form). Returns
    ([(node, its first saves of the storages it stores)], diagnostics)."""
    diags: list[Diagnostic] = []
    wanted = set(nodes)
    names = {n.name for n in gm.graph.nodes}
    for w in sorted(wanted - names):
        diags.append(Diagnostic(pass_name, f"no node named {w!r}", level="warning"))
    groups: dict[str, set[str]] = {}
    for recs in saved.values():
        for r in recs:
            if r.skip is None and r.shared_with is not None:
                groups.setdefault(r.shared_with, {r.shared_with}).add(r.node)
    if wanted:
        closure = set(wanted)
        for members in groups.values():
            if members & wanted:
                closure |= members
        for extra in sorted(closure - wanted):
            diags.append(Diagnostic(pass_name, "also wrapped: it saves a storage a chosen node saves", node=extra))
        wanted = closure
    picked = []
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
            diags.append(Diagnostic(pass_name, f"{len(skipped)} saved tensor(s) kept as is ({why})", node=n.name))
        if todo:
            picked.append((n, [r for r in todo if r.shared_with is None]))
    return picked, diags


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
        picked, diags = choose_nodes(gm, saved, self.nodes, self.name)
        chosen = []
        tensors = headwise_tensors = 0
        for n, unique in picked:
            heads = _heads_of(n) if cfg.headwise else None
            chosen.append((n, heads))
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
        heads_of = {n.name: heads for n, heads in chosen}
        wrap_nodes(gm, RUNTIME_ATTR, runtime, [n for n, _ in chosen],
                   lambda n: QuantizedCall(runtime, n.op, n.target, n.name, heads_of[n.name]),
                   lambda n: {"bits": cfg.bits, "heads": heads_of[n.name]})
        # extra_time_us / bytes_saved: the planner's pricing (price_candidates) of what was chosen.
        return PassResult(gm, True, {"nodes": len(chosen), "tensors": tensors,
                                     "headwise_tensors": headwise_tensors, "extra_time_us": extra_time_us,
                                     "bytes_saved": bytes_saved}, diags)


def quantize_stats(gm: torch.fx.GraphModule):
    """The running counters (QuantStats) of a graph rewritten by the pass, or None."""
    rt = getattr(gm, RUNTIME_ATTR, None)
    return rt.state.stats if rt is not None else None
