"""What the sdpa-attention pass recognizes: operator kinds of the explicit attention pattern
(matmul, scale, mask, softmax, dropout) on both capture roads, scalar constants, and masks
that are causal (a lower triangle) or additive. Pure reading of the graph; the rewrite is in
memfit.passes.sdpa_attention."""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from memfit.ir.fx_utils import fetch_attr

aten = torch.ops.aten
prims = torch.ops.prims


_FN_KINDS = {
    "matmul": {aten.matmul.default, aten.bmm.default, torch.matmul, torch.bmm, operator.matmul},
    "softmax": {aten.softmax.int, aten._softmax.default, torch.softmax, F.softmax},
    "mul": {aten.mul.Tensor, aten.mul.Scalar, operator.mul, torch.mul},
    "div": {aten.div.Tensor, aten.div.Scalar, operator.truediv, torch.div},
    "add": {aten.add.Tensor, operator.add, torch.add},
    "masked_fill": {aten.masked_fill.Scalar, aten.masked_fill.Tensor, torch.masked_fill},
    "where": {aten.where.self, aten.where.ScalarOther, torch.where},
    "dropout": {aten.dropout.default, F.dropout, torch.dropout},
    "cast": {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, prims.convert_element_type.default,
             aten.type_as.default},
    "transpose": {aten.transpose.int, torch.transpose},
    "permute": {aten.permute.default, torch.permute},
    "slice": {aten.slice.Tensor},
    "eq": {aten.eq.Scalar, torch.eq, operator.eq},
    "ne": {aten.ne.Scalar, torch.ne, operator.ne},
    "not": {aten.logical_not.default, aten.bitwise_not.default, torch.logical_not, operator.invert},
    "alias": {aten.alias.default, aten.detach.default},
    "getitem": {operator.getitem},
    "assert": {aten._assert_tensor_metadata.default},
}
_METHOD_KINDS = {
    "matmul": "matmul", "bmm": "matmul", "softmax": "softmax", "mul": "mul", "div": "div", "add": "add",
    "masked_fill": "masked_fill", "float": "cast", "to": "cast", "type_as": "cast", "half": "cast",
    "bfloat16": "cast", "transpose": "transpose", "permute": "permute", "eq": "eq", "ne": "ne",
    "logical_not": "not", "bool": "cast",
}
_FN_TO_KIND = {fn: kind for kind, fns in _FN_KINDS.items() for fn in fns}


def _kind(gm, n) -> str | None:
    if not isinstance(n, torch.fx.Node):
        return None
    if n.op == "call_function":
        return _FN_TO_KIND.get(n.target)
    if n.op == "call_method":
        return _METHOD_KINDS.get(n.target)
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if isinstance(mod, nn.Dropout):
            return "dropout"
        if isinstance(mod, nn.Softmax):
            return "softmax"
    return None


def _arg(n, i, name, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


def _users(n):
    """Users other than export's metadata assertions."""
    return [u for u in n.users if _FN_TO_KIND.get(u.target) != "assert"]


def _same(a, b) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    try:
        return bool(statically_known_true(a == b)) if not (isinstance(a, int) and isinstance(b, int)) else a == b
    except Exception:  # noqa: BLE001 - unknown symbolic relation: treat as different
        return False


def _describe(n) -> str:
    if not isinstance(n, torch.fx.Node):
        return repr(n)
    return f"{n.op} {n.target}" if n.op != "call_function" else f"{getattr(n.target, '__name__', n.target)}"


def _is_scalar(a) -> bool:
    """A Python number, or (symbolic_trace graphs) a node computing one from shapes."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return True
    if isinstance(a, torch.fx.Node):
        v = _val(a)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and a.op != "placeholder"
    return False


def _number(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return None


def _const_fill(gm, n):
    """The value of a scalar constant node (full([], -inf), scalar_tensor, a 0-d buffer or lifted
    constant, through copies and detaches), else None."""
    while n.op == "call_function" and n.target in _CONST_PASSTHROUGH:
        n = n.args[0]
    if n.op == "call_function" and n.target in (aten.full.default, torch.full):
        return _number(n.args[1]) if len(n.args) > 1 else None
    if n.op == "call_function" and n.target in (aten.scalar_tensor.default, torch.scalar_tensor):
        return _number(n.args[0])
    if n.op == "get_attr":
        t = fetch_attr(gm, str(n.target))
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t.reshape(()).item())
    return None


_CONST_PASSTHROUGH = {aten.lift_fresh_copy.default, aten.detach_.default, aten.detach.default,
                      aten.alias.default, aten.clone.default}


def _slice_is_prefix(n, dim_of_last2) -> bool:
    start = _arg(n, 2, "start", None)
    step = _arg(n, 4, "step", 1)
    return start in (None, 0) and step == 1


def _is_causal_cond(gm, cond, *, masked_when: bool) -> bool:
    """True if `cond` is, for every size, the top-left causal pattern (or its negation).

    Accepts chains of prefix slices, eq/ne with 0/1, logical_not, casts to bool and getitem
    with prefix slices from one constant buffer; the buffer, pushed through the chain without
    the slices, must be constant over leading dimensions and equal to tril(ones) (keep) on its
    square last two dimensions. Prefixes of a tril pattern are top-left causal, which is
    SDPA's is_causal.
    """
    ops = []
    n = cond
    while isinstance(n, torch.fx.Node) and n.op != "get_attr":
        k = _kind(gm, n)
        if k == "slice":
            nd = _val(n.args[0]).dim() if _val(n.args[0]) is not None else None
            if nd is None or not _slice_is_prefix(n, nd):
                return False
            n = n.args[0]
        elif k == "getitem":
            idx = n.args[1]
            idx = idx if isinstance(idx, tuple) else (idx,)
            if not all(isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) for s in idx):
                return False
            n = n.args[0]
        elif k in ("eq", "ne"):
            other = n.args[1]
            if _number(other) not in (0.0, 1.0):
                return False
            ops.append((k, _number(other)))
            n = n.args[0]
        elif k == "not":
            ops.append(("not", None))
            n = n.args[0]
        elif k in ("cast", "alias"):
            ops.append(("bool", None) if (_val(n) is not None and _val(n).dtype == torch.bool) else ("id", None))
            n = n.args[0]
        else:
            return False
    if not isinstance(n, torch.fx.Node):
        return False
    buf = fetch_attr(gm, str(n.target))
    if not isinstance(buf, torch.Tensor) or buf.dim() < 2 or buf.shape[-1] != buf.shape[-2]:
        return False
    t = buf.detach()
    for op, arg in reversed(ops):
        if op == "eq":
            t = t == arg
        elif op == "ne":
            t = t != arg
        elif op == "not":
            t = ~t.bool()
        elif op == "bool":
            t = t.bool()
    if t.dtype != torch.bool:
        return False
    keep = ~t if masked_when else t
    size = keep.shape[-1]
    tril = torch.ones(size, size, dtype=torch.bool).tril()
    flat = keep.reshape(-1, size, size)
    return bool((flat == tril).all())
