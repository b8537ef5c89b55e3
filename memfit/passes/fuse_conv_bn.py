"""fuse-conv-bn: convolution followed by eval-mode BatchNorm, computed in "tune mode".

With frozen BatchNorm (eval mode: running statistics, the transfer-learning case) a
convolution's output is kept only for BatchNorm's backward. Folding BatchNorm into the
convolution at every call (memfit.runtime.conv_bn, Xiong et al., ICLR 2024) removes that saved
activation, one per Conv+BN pair, with the same function and gradients for the convolution's
weight and bias and BatchNorm's affine parameters (float rounding aside).

Graphs handled:
- export graphs (training IR): `aten.conv{1,2,3}d.{default,padding}` or
  `aten.convolution.default` (not transposed) feeding `aten.batch_norm.default` with
  training=False or `aten._native_batch_norm_legit_no_training.default`. The BN mode is fixed
  at capture; BatchNorm's tensors stay get_attr nodes, read at every call.
- symbolic_trace graphs: `call_module` nn.Conv{1,2,3}d feeding nn.BatchNorm{1,2,3}d; the new
  node calls `conv_bn_module_call(x, conv, bn)` on the modules themselves, which checks
  `bn.training` at every call (so a later train/eval switch is honoured).

`deploy=true` folds once at pass time into new tensors held by the graph module (inference
only: gradients no longer reach the original convolution and BatchNorm parameters).
BatchNorm in training mode is left alone, with a diagnostic.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx
from torch import nn

from memfit.passes.infra.base import EXACT, Diagnostic, Pass, PassContext, PassResult, Promise
from memfit.passes.infra.registry import register_pass
from memfit.runtime.conv_bn import conv_bn_module_call, conv_bn_tune, fold_conv_bn, fold_conv_bn_weights

aten = torch.ops.aten

_CONV_OPS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# aten.convNd signature defaults: (input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1)
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)


@dataclass(frozen=True)
class _ConvArgs:
    x: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    stride: object
    padding: object
    dilation: object
    groups: int


@dataclass(frozen=True)
class _BNArgs:
    out: torch.fx.Node            # the node whose uses the fused value replaces
    weight: torch.fx.Node | None
    bias: torch.fx.Node | None
    running_mean: torch.fx.Node | None
    running_var: torch.fx.Node | None
    eps: float
    extra: tuple = ()             # nodes to erase besides the BN node (getitem)


@register_pass
@dataclass(frozen=True)
class FuseConvBN(Pass):
    """Conv + eval-mode BatchNorm -> one op folding BN into the conv at every call.

    Options: deploy (fold once at pass time, for inference).
    Stats: `tune` (pairs rewritten to tune mode), `folded` (deploy), `train_mode_bn` (BN in
    training mode, left alone), `skipped` (other candidates left alone; see diagnostics).
    """

    name: ClassVar[str] = "fuse-conv-bn"
    promise: ClassVar[Promise] = EXACT
    deploy: bool = False

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"tune": 0, "folded": 0, "train_mode_bn": 0, "skipped": 0}
        diags: list[Diagnostic] = []
        if self.deploy and ctx.captured is not None and getattr(ctx.captured, "training", False):
            diags.append(Diagnostic(self.name, "deploy=true folds once at pass time: gradients no "
                                    "longer reach the folded convolutions and BatchNorms; use it for "
                                    "inference only", level="warning"))
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False):  # erased by an earlier rewrite
                continue
            if node.op == "call_function" and node.target in (aten.batch_norm.default,
                                                               aten._native_batch_norm_legit_no_training.default):
                self._rewrite_aten(gm, node, stats, diags)
            elif node.op == "call_module" and isinstance(_submodule(gm, node.target), _BN_MODULES):
                self._rewrite_module(gm, node, stats, diags)
        modified = stats["tune"] + stats["folded"] > 0
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified=modified, stats=stats, diagnostics=diags)

    # ------------------------------------------------------------------ export graphs

    def _skip(self, stats, diags, node, why, key="skipped"):
        stats[key] += 1
        diags.append(Diagnostic(self.name, why, node=node.name))

    def _rewrite_aten(self, gm, bn_node, stats, diags):
        graph = gm.graph
        if bn_node.target is aten.batch_norm.default:
            args = list(bn_node.args) + [None] * (9 - len(bn_node.args))
            training = bn_node.kwargs.get("training", args[5])
            eps = bn_node.kwargs.get("eps", args[7])
            if training:
                # Batch statistics: the conv output is needed for the statistics themselves.
                return self._skip(stats, diags, bn_node, "BatchNorm in training mode (batch statistics) "
                                  "left alone; freeze it with .eval() before capture to fuse", "train_mode_bn")
            bn = _BNArgs(bn_node, args[1], args[2], args[3], args[4], float(eps))
        else:
            # (input, weight, bias, running_mean, running_var, momentum, eps) -> (out, mean, rstd)
            users = list(bn_node.users)
            if not all(u.target is operator.getitem and u.args[1] == 0 for u in users) or len(users) != 1:
                return self._skip(stats, diags, bn_node, "BatchNorm's saved statistics are used elsewhere")
            a = bn_node.args
            bn = _BNArgs(users[0], a[1], a[2], a[3], a[4], float(a[6]))
        if bn.running_mean is None or bn.running_var is None:
            return self._skip(stats, diags, bn_node, "BatchNorm without running statistics "
                              "(track_running_stats=False) uses batch statistics; left alone")
        conv_node = bn_node.args[0]
        conv = _conv_args(conv_node)
        if conv is None:
            return self._skip(stats, diags, bn_node, f"input is {_describe(conv_node)}, not a "
                              "(non-transposed) convolution")
        if len(conv_node.users) != 1:
            return self._skip(stats, diags, bn_node, "the convolution's output has other users, so "
                              "it stays alive anyway")
        w_val = conv_node.args[1].meta.get("val") if isinstance(conv_node.args[1], torch.fx.Node) else None
        if w_val is None or w_val.dim() not in (3, 4, 5):
            return self._skip(stats, diags, bn_node, "convolution weight has unknown or unsupported rank")

        if self.deploy:
            return self._deploy_aten(gm, conv_node, conv, bn_node, bn, stats, diags)

        with graph.inserting_before(bn_node):
            new = graph.call_function(conv_bn_tune, (conv.x, conv.weight, conv.bias, bn.weight, bn.bias,
                                                     bn.running_mean, bn.running_var, bn.eps, conv.stride,
                                                     conv.padding, conv.dilation, conv.groups))
        _copy_meta(bn.out, new)
        bn.out.replace_all_uses_with(new)
        _erase(graph, [bn.out, bn_node, conv_node])
        stats["tune"] += 1

    def _deploy_aten(self, gm, conv_node, conv, bn_node, bn, stats, diags):
        graph = gm.graph
        tensors = []
        for n in (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var):
            if n is None:
                tensors.append(None)
            elif isinstance(n, torch.fx.Node) and n.op == "get_attr":
                tensors.append(_submodule(gm, n.target))
            else:
                return self._skip(stats, diags, bn_node, "deploy needs parameters and statistics held "
                                  "by the module (get_attr), found a computed value")
        with torch.no_grad():
            w, b = fold_conv_bn_weights(*tensors, bn.eps)
        base = f"_memfit_folded_{conv_node.name}"
        gm.register_buffer(base + "_weight", w.detach().clone())
        gm.register_buffer(base + "_bias", b.detach().clone())
        with graph.inserting_before(conv_node):
            w_node = graph.get_attr(base + "_weight")
            b_node = graph.get_attr(base + "_bias")
        fake = _fake_mode(bn_node)
        for node, t in ((w_node, w), (b_node, b)):
            node.meta["val"] = fake.from_tensor(t) if fake is not None else t.detach()
        with graph.inserting_before(bn_node):
            new = graph.call_function(_conv, (conv.x, w_node, b_node, conv.stride, conv.padding, conv.dilation,
                                       conv.groups))
        _copy_meta(bn.out, new)
        bn.out.replace_all_uses_with(new)
        _erase(graph, [bn.out, bn_node, conv_node])
        stats["folded"] += 1

    # ------------------------------------------------------------------ symbolic_trace graphs

    def _rewrite_module(self, gm, bn_node, stats, diags):
        graph = gm.graph
        bn_mod = _submodule(gm, bn_node.target)
        if bn_mod.training:
            return self._skip(stats, diags, bn_node, "BatchNorm in training mode (batch statistics) "
                              "left alone; freeze it with .eval() to fuse", "train_mode_bn")
        if bn_mod.running_mean is None:
            return self._skip(stats, diags, bn_node, "BatchNorm without running statistics "
                              "(track_running_stats=False) uses batch statistics; left alone")
        conv_node = bn_node.args[0] if bn_node.args else None
        conv_mod = (_submodule(gm, conv_node.target)
                    if isinstance(conv_node, torch.fx.Node) and conv_node.op == "call_module" else None)
        if not isinstance(conv_mod, _CONV_MODULES):
            return self._skip(stats, diags, bn_node, f"input is {_describe(conv_node)}, not an "
                              "nn.Conv1d/2d/3d module")
        if len(conv_node.users) != 1:
            return self._skip(stats, diags, bn_node, "the convolution's output has other users, so "
                              "it stays alive anyway")
        if self.deploy:
            name = "_memfit_folded_" + conv_node.name
            gm.add_submodule(name, fold_conv_bn(conv_mod, bn_mod))
            with graph.inserting_before(bn_node):
                new = graph.call_module(name, (conv_node.args[0],))
            key = "folded"
        else:
            with graph.inserting_before(bn_node):
                c = graph.get_attr(conv_node.target)
                b = graph.get_attr(bn_node.target)
                c.meta["val"] = b.meta["val"] = None  # modules, not tensors
                new = graph.call_function(conv_bn_module_call, (conv_node.args[0], c, b))
            key = "tune"
        _copy_meta(bn_node, new)
        bn_node.replace_all_uses_with(new)
        _erase(graph, [bn_node, conv_node])
        stats[key] += 1


def _conv(x, weight, bias, stride, padding, dilation, groups):
    """A plain convolution (1d/2d/3d from the weight's rank); the deploy rewrite's target."""
    fn = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d,
          5: torch.nn.functional.conv3d}[weight.dim()]
    return fn(x, weight, bias, stride, padding, dilation, groups)


def _conv_args(node) -> _ConvArgs | None:
    if not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return None
    if node.target in _CONV_OPS:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        vals = list(node.args) + list(_CONV_DEFAULTS[len(node.args):])
        for i, nm in enumerate(names):
            if nm in node.kwargs:
                vals[i] = node.kwargs[nm]
        return _ConvArgs(*vals)
    if node.target is aten.convolution.default:
        # (input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
        a = node.args
        if len(a) < 9 or a[6]:
            return None
        return _ConvArgs(a[0], a[1], a[2], a[3], a[4], a[5], a[8])
    return None


def _submodule(gm, target: str):
    obj = gm
    for part in str(target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _describe(node) -> str:
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    return f"{node.op} {node.target}" if node.op != "call_function" else str(node.target)


def _copy_meta(src: torch.fx.Node, dst: torch.fx.Node) -> None:
    for k in ("val", "tensor_meta", "nn_module_stack", "stack_trace", "source_fn_stack"):
        if k in src.meta:
            dst.meta[k] = src.meta[k]


def _fake_mode(node):
    from torch._guards import detect_fake_mode
    v = node.meta.get("val")
    return detect_fake_mode([v]) if isinstance(v, torch.Tensor) else None


def _erase(graph: torch.fx.Graph, nodes) -> None:
    for n in dict.fromkeys(nodes):
        if not getattr(n, "_erased", False) and not n.users:
            graph.erase_node(n)
