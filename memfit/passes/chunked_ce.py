"""chunked-ce: the output projection and its cross-entropy loss, computed in chunks of rows.

Matches `cross_entropy(linear(h, W, b), target)` in the captured graph, with the logits going
through reshapes that keep the class dimension last (flatten, view, reshape) and at most one
cast (a model's `logits.float()`), and replaces the loss with one call of
memfit.runtime.chunked_ce.chunked_linear_cross_entropy: the logits, their log-softmax and
their gradient (each N x V) are never whole, one chunk of rows at a time instead, at the cost
of computing the logits again in backward (one more matmul of the projection). Exact.

Graphs handled: export (aten.linear, aten.cross_entropy_loss) and symbolic_trace (nn.Linear
or F.linear, F.cross_entropy or nn.CrossEntropyLoss). Skipped with a diagnostic: class weights,
a class dimension that is not last, logits that go through anything but reshapes and one cast.
Logits the model also returns (Hugging Face models return them beside the loss) stay whole in
forward; the pass still drops the loss's own N x V copies, and says so.

Chunks: `chunk_rows=0` takes Liger-Kernel's rule, about ceil(N / ceil(V / D)) rows rounded up
to a power of two, so one chunk of logits is about the size of the hidden states h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from memfit.ir.fx_utils import erase_dead, size_hint
from memfit.passes.infra.base import Diagnostic, Pass, PassContext, PassResult
from memfit.passes.infra.registry import register_pass
from memfit.runtime.chunked_ce import chunked_linear_cross_entropy

aten = torch.ops.aten
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_VIEW_FUNCS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
               torch.flatten, torch.reshape, aten.contiguous.default}
_VIEW_METHODS = {"view", "reshape", "flatten", "contiguous"}
_CASTS = {aten._to_copy.default, aten.to.dtype, torch.ops.prims.convert_element_type.default}
_CAST_METHODS = {"float", "to"}


@dataclass
class _Loss:
    node: torch.fx.Node           # the cross-entropy node
    logits: torch.fx.Node         # its input
    target: torch.fx.Node
    reduction: int
    ignore_index: int
    label_smoothing: float


@register_pass
@dataclass(frozen=True)
class ChunkedCE(Pass):
    """Output projection + cross-entropy in chunks of rows: the logits are never whole (exact).

    chunk_rows: rows per chunk (0: about the size of the hidden states, Liger's rule)."""

    name: ClassVar[str] = "chunked-ce"
    chunk_rows: int = 0

    def __post_init__(self):
        if self.chunk_rows < 0:
            raise ValueError(f"chunk_rows must be >= 0, got {self.chunk_rows}")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"rewritten": 0, "skipped": 0, "logits_also_returned": 0}
        diags: list[Diagnostic] = []
        for node in list(gm.graph.nodes):
            loss = _as_loss(gm, node)
            if loss is None:
                continue
            why = self._rewrite(gm, loss, stats, diags)
            if why:
                stats["skipped"] += 1
                diags.append(Diagnostic(self.name, why, node=node.name))
        if stats["rewritten"]:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified=stats["rewritten"] > 0, stats=stats, diagnostics=diags)

    def _rewrite(self, gm, loss: _Loss, stats, diags) -> str | None:
        if loss.reduction is None:
            return "cross-entropy with class weights or a legacy reduction: left alone"
        lv = loss.logits.meta.get("val")
        if not isinstance(lv, torch.Tensor) or lv.dim() != 2:
            return "logits are not (rows, classes): the class dimension must be last"
        chain, upcast, src = [], None, loss.logits
        while True:
            if _is_view(src):
                chain.append(src)
                src = src.args[0]
            elif _cast_dtype(src) is not None and upcast is None:
                upcast = _cast_dtype(src)
                chain.append(src)
                src = src.args[0]
            else:
                break
        lin = _as_linear(gm, src)
        if lin is None:
            return f"logits come from {_describe(src)}, not a linear layer (through reshapes and one cast)"
        h, weight, bias = lin
        wv = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else weight[1]
        if not isinstance(wv, torch.Tensor) or not isinstance(h.meta.get("val"), torch.Tensor) or wv.dim() != 2:
            return "the linear layer's weight or input has no shape metadata"
        vocab, dim = size_hint(wv.shape[0]), size_hint(wv.shape[1])
        if size_hint(lv.shape[1]) != vocab:
            return "the reshapes move the class dimension"
        rows = size_hint(lv.shape[0])
        chunk = self.chunk_rows or 2 ** math.ceil(math.log2(max(1, math.ceil(rows / max(1, math.ceil(vocab / dim))))))
        graph = gm.graph
        weight, bias = _materialize(gm, src, weight), _materialize(gm, src, bias)
        with graph.inserting_before(loss.node):
            new = graph.call_function(chunked_linear_cross_entropy,
                                      (h, weight, bias, loss.target, loss.reduction, loss.ignore_index,
                                       loss.label_smoothing, upcast, min(chunk, rows)))
        new.meta.update({k: v for k, v in loss.node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack",
                                                                          "stack_trace")})
        loss.node.replace_all_uses_with(new)
        graph.erase_node(loss.node)
        erase_dead(graph, chain + [src])   # the projection too, unless the logits are used elsewhere
        stats["rewritten"] += 1
        # export's _assert_tensor_metadata checks read the logits without keeping them
        if any(u.target is not aten._assert_tensor_metadata.default for m in [src] + chain
               if not getattr(m, "_erased", False) for u in m.users):
            stats["logits_also_returned"] += 1
            diags.append(Diagnostic(self.name, "the logits are also used outside the loss (returned): they stay "
                                    "whole in forward; the loss's log-softmax and logit gradient do not",
                                    node=new.name))
        return None


def _as_loss(gm, n) -> _Loss | None:
    if n.op == "call_function" and n.target is aten.cross_entropy_loss.default:
        a = list(n.args) + [None] * (6 - len(n.args))
        weight = n.kwargs.get("weight", a[2])
        red = n.kwargs.get("reduction", 1 if a[3] is None else a[3])
        ii = n.kwargs.get("ignore_index", -100 if a[4] is None else a[4])
        ls = n.kwargs.get("label_smoothing", 0.0 if a[5] is None else a[5])
        return _Loss(n, a[0], a[1], None if weight is not None else int(red), int(ii), float(ls))
    if n.op == "call_function" and n.target is F.cross_entropy:
        kw = dict(n.kwargs)
        names = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction", "label_smoothing")
        kw.update(dict(zip(names, n.args)))
        legacy = kw.get("size_average") is not None or kw.get("reduce") is not None
        red = _REDUCTIONS.get(kw.get("reduction", "mean"))
        ok = kw.get("weight") is None and not legacy and red is not None
        return _Loss(n, kw["input"], kw["target"], red if ok else None, int(kw.get("ignore_index", -100)),
                     float(kw.get("label_smoothing", 0.0)))
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, nn.CrossEntropyLoss) and len(n.args) == 2 and not n.kwargs:
            red = _REDUCTIONS.get(mod.reduction) if mod.weight is None else None
            return _Loss(n, n.args[0], n.args[1], red, mod.ignore_index, mod.label_smoothing)
    return None


def _is_view(n) -> bool:
    if not isinstance(n, torch.fx.Node):
        return False
    return (n.op == "call_function" and n.target in _VIEW_FUNCS) or (n.op == "call_method" and n.target in _VIEW_METHODS)


def _cast_dtype(n):
    """The float dtype a cast node converts to, else None."""
    if not isinstance(n, torch.fx.Node):
        return None
    v = n.meta.get("val")
    dtype = v.dtype if isinstance(v, torch.Tensor) else None
    if n.op == "call_function" and n.target in _CASTS:
        return dtype if dtype is not None and dtype.is_floating_point else None
    if n.op == "call_method" and n.target in _CAST_METHODS:
        if n.target == "to" and any(not isinstance(a, torch.dtype) for a in n.args[1:]):
            return None
        return dtype if dtype is not None and dtype.is_floating_point else None
    return None


def _as_linear(gm, n):
    """(h, weight, bias) if `n` computes linear(h, W, b), else None. Weight and bias are nodes,
    or for an nn.Linear call_module ("attr", tensor, target) to be made get_attr nodes
    (`_materialize`) once the rewrite is sure."""
    if not isinstance(n, torch.fx.Node):
        return None
    if n.op == "call_function" and n.target in (aten.linear.default, F.linear):
        a = list(n.args) + [None] * (3 - len(n.args))
        return a[0], a[1], n.kwargs.get("bias", a[2])
    if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear) and len(n.args) == 1:
        mod = gm.get_submodule(str(n.target))
        bias = ("attr", mod.bias, f"{n.target}.bias") if mod.bias is not None else None
        return n.args[0], ("attr", mod.weight, f"{n.target}.weight"), bias
    return None


def _materialize(gm, at: torch.fx.Node, spec):
    """A node for `spec`: itself if it is one, else a get_attr of the module's parameter,
    inserted before `at`, with FakeTensor metadata."""
    if spec is None or isinstance(spec, torch.fx.Node):
        return spec
    _, tensor, target = spec
    with gm.graph.inserting_before(at):
        node = gm.graph.get_attr(target)
    node.meta["val"] = _fake_like(at, tensor)
    return node


def _fake_like(node, t):
    from torch._subclasses.fake_tensor import FakeTensor

    v = node.meta.get("val")
    mode = v.fake_mode if isinstance(v, FakeTensor) else None
    return mode.from_tensor(t) if mode is not None else t


def _describe(n) -> str:
    if not isinstance(n, torch.fx.Node):
        return repr(n)
    t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
    return f"{n.op} {t}"

