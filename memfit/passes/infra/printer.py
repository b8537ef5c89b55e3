"""A stable, readable text form of a captured graph (in the spirit of `mlir-opt` output).

One line per node:

    %linear = aten.linear.default(%x, %fc1_weight, %fc1_bias) : f32[8, 256] saved=8.00 KiB module=fc1

- the target: `aten.<op>.<overload>` for aten ops, `torch.relu` / `operator.getitem` for
  Python callables, `.view` for methods, `@fc1` for a `call_module`, `get_attr fc1.weight`,
  `placeholder`;
- the type from `node.meta["val"]`: dtype short name and shape (symbolic sizes by their
  symbol, `s77`), a tuple of types for multi-output nodes, `sym`/`int` for sizes;
- `saved=` the bytes autograd keeps for backward from this node (`NodeCost.saved_bytes` in
  `node.meta["memfit"]`, written by `memfit.cost_models.memory.analyze_step`), when known
  and non-zero;
- `module=` the module path the node comes from (capture metadata), when not top level.

Child graph modules called by the graph (outlined regions) follow as their own `graph`
blocks. Output is deterministic: it depends only on the graph and its metadata.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx

__all__ = ["format_graph", "format_node", "format_type"]

_DTYPES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1", torch.complex64: "c64",
}


def format_type(val: Any) -> str:
    """'f32[8, 64]' for a tensor, '(f32[8], i64[8])' for a tuple, 'sym' / 'int' for sizes."""
    if isinstance(val, torch.Tensor):
        dt = _DTYPES.get(val.dtype, str(val.dtype).replace("torch.", ""))
        return f"{dt}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return f"sym {val}"
    if isinstance(val, bool):
        return "bool"
    if isinstance(val, int):
        return "int"
    if isinstance(val, float):
        return "float"
    if val is None:
        return "none"
    return type(val).__name__


def _target(node: torch.fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        mod = _owner_module(node, t)
        if mod is not None and not isinstance(mod, torch.fx.GraphModule) and \
                any(isinstance(c, torch.fx.GraphModule) for c in mod.children()):
            return f"@{t}<{type(mod).__name__}>"  # a wrapper around an outlined region
        return f"@{t}"
    if node.op == "call_method":
        return f".{t}"
    if node.op == "get_attr":
        return f"get_attr {t}"
    if node.op == "placeholder":
        return "placeholder"
    if isinstance(t, torch._ops.OpOverload):  # noqa: SLF001
        return f"{t.namespace}.{t._opname}.{t._overloadname}"  # noqa: SLF001
    if isinstance(t, torch._ops.OpOverloadPacket):  # noqa: SLF001
        return f"{t._qualified_op_name.replace('::', '.')}"  # noqa: SLF001
    if getattr(operator, getattr(t, "__name__", ""), None) is t:
        return f"operator.{t.__name__}"
    name = getattr(t, "__name__", None)
    for prefix, ns in (("torch", torch), ("torch.nn.functional", torch.nn.functional)):
        if name and getattr(ns, name, None) is t:
            return f"{prefix}.{name}"
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or name or repr(t)
    if mod.startswith("torch._C._nn"):
        mod = "torch.nn.functional"
    elif mod.startswith("torch._C") or mod.startswith("torch._tensor") or mod == "torch.functional":
        mod = "torch"
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def _owner_module(node: torch.fx.Node, target):
    gm = node.graph.owning_module
    try:
        return gm.get_submodule(str(target)) if gm is not None else None
    except AttributeError:
        return None


def _arg(a: Any) -> str:
    if isinstance(a, torch.fx.Node):
        return f"%{a.name}"
    if isinstance(a, tuple):
        return "(" + ", ".join(_arg(x) for x in a) + ("," if len(a) == 1 else "") + ")"
    if isinstance(a, list):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return _DTYPES.get(a, str(a))
    if isinstance(a, float):
        return repr(a)
    if isinstance(a, (torch.device, torch.layout, torch.memory_format)):
        return str(a)
    if isinstance(a, torch.Tensor):
        return f"<tensor {format_type(a)}>"
    return repr(a)


def _bytes(n: float) -> str:
    from memfit.budget import format_bytes
    return format_bytes(n)


def format_node(node: torch.fx.Node, *, saved: bool = True, module: bool = True) -> str:
    """One line for `node` (without indentation)."""
    from memfit.passes.infra.regions import module_path

    if node.op == "output":
        return "return " + _arg(node.args[0])
    head = f"%{node.name} = {_target(node)}"
    if node.op not in ("placeholder", "get_attr"):
        args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
        head += "(" + ", ".join(args) + ")"
    line = head + " : " + (format_type(node.meta["val"]) if "val" in node.meta else "?")
    if saved:
        cost = node.meta.get("memfit")
        b = getattr(cost, "saved_bytes", 0) if cost is not None else 0
        if b:
            line += f" saved={_bytes(b)}"
    if module and node.op not in ("placeholder", "get_attr"):
        path = module_path(node)
        if path:
            line += f" module={path}"
    return line


def format_graph(gm: torch.fx.GraphModule, *, name: str | None = None, saved: bool = True,
                 module: bool = True, children: bool = True) -> str:
    """The whole graph as text; outlined child GraphModules follow as their own blocks."""
    lines = [f"graph @{name or type(gm).__name__} {{"]
    sub = []
    for node in gm.graph.nodes:
        lines.append("  " + format_node(node, saved=saved, module=module))
        if children and node.op == "call_module":
            child = gm.get_submodule(str(node.target))
            if isinstance(child, torch.fx.GraphModule):
                sub.append((str(node.target), child))
            else:
                # a wrapper (checkpointing, offload) around an outlined graph: show what it runs
                for cname, inner in child.named_children():
                    if isinstance(inner, torch.fx.GraphModule):
                        sub.append((f"{node.target}.{cname}", inner))
    total = sum(getattr(n.meta.get("memfit"), "saved_bytes", 0) or 0 for n in gm.graph.nodes)
    lines.append("}" + (f"  // saved={_bytes(total)}" if saved and total else ""))
    out = "\n".join(lines)
    for sub_name, child in sub:
        out += "\n" + format_graph(child, name=sub_name, saved=saved, module=module, children=children)
    return out
