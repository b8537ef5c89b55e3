"""Generic graph surgery: find the nodes of a module, move a set of nodes into a submodule.

`module_regions(gm, pattern)` groups the compute nodes of a captured graph by the outermost
module whose dotted path matches `pattern`; it reads `call_module` targets and
`nn_module_stack` metadata, so it works on both `symbolic_trace` and `torch.export` graphs.

`outline_region(gm, nodes, name)` moves a convex set of nodes into a child GraphModule
registered on `gm` as `name` and replaces them with one `call_module` node. Parameters stay
owned by the parent, so the parent's `state_dict` keys and tensors do not change:

- `get_attr` nodes (export graphs: every parameter and buffer) stay in the parent and are fed
  to the child as extra inputs, so a wrapper such as `torch.utils.checkpoint.checkpoint`
  sees the parameters as arguments;
- `call_module` nodes (symbolic_trace graphs: leaf modules such as nn.Linear) are kept inside
  the child, calling the parent's module object, which the child *borrows*: it is stored in
  the child's `__dict__`, not registered as a submodule, so it appears in neither
  `parameters()` nor `state_dict()` of the child (nor twice in the parent's).

Every node the outlining creates carries `meta["val"]` (FakeTensors copied from the nodes it
replaces), so the cost model and later passes keep working.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from collections import OrderedDict

import torch
import torch.fx

from memfit.ir.capture import _clean_path, node_module_path
from memfit.errors import PassError

__all__ = ["module_regions", "outline_region", "region_inputs_outputs", "module_path",
           "borrowed_modules", "REGION_META"]

# node.meta key set on the call node of an outlined region: {"name": str, "nodes": int}
REGION_META = "memfit_region"

# torch.export gives top-level nodes (sym_size of inputs) this placeholder module name.
_EXPORT_EMPTY_STACK = "_empty_nn_module_stack_from_metadata_hook"

_COMPUTE_OPS = ("call_function", "call_method", "call_module")


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost module that produced `node` ('' for the top level)."""
    if node.op == "call_module" and REGION_META in node.meta:
        # an outlined region: attribute it to the modules its nodes shared, not to the
        # child's attribute name
        stack = node.meta.get("nn_module_stack")
        return _clean_path(list(stack.values())[-1][0]) if stack else ""
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_module" and stack:
        # inside an outlined child the target is the borrowed module's local name
        path = _clean_path(list(stack.values())[-1][0])
    else:
        path = node_module_path(node)
    if path.startswith(_EXPORT_EMPTY_STACK):
        return ""
    return path


def _matcher(pattern):
    if isinstance(pattern, re.Pattern):
        return lambda s: pattern.fullmatch(s) is not None
    if not isinstance(pattern, str):
        raise PassError(f"module pattern must be a str (fnmatch) or re.Pattern, got {type(pattern).__name__}")
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda s: rx.fullmatch(s) is not None
    return lambda s: fnmatch.fnmatchcase(s, pattern)


def module_regions(gm: torch.fx.GraphModule, pattern) -> dict[str, list[torch.fx.Node]]:
    """Group compute nodes by the outermost module whose path matches `pattern`.

    `pattern`: an fnmatch pattern on dotted module paths ("blocks.*", "encoder.layer.?"),
    a compiled regular expression, or a string "re:<regex>"; both must match the whole path.
    For each node the prefixes of its module path are tried shortest first, so with
    "blocks.*" a node of "blocks.0.attn.qkv" belongs to region "blocks.0".

    Returns {module path: nodes in graph order}, regions in graph order. Placeholders,
    get_attr and output nodes never belong to a region.
    """
    nodes = [n for n in gm.graph.nodes if n.op in _COMPUTE_OPS]
    return dict(group_by_pattern(nodes, pattern, module_path))


def group_by_pattern(nodes, pattern, path_of) -> "OrderedDict[str, list[torch.fx.Node]]":
    """{outermost matching prefix of path_of(node): nodes in the given order}; nodes whose
    path is empty or has no matching prefix are left out."""
    match = _matcher(pattern)
    regions: "OrderedDict[str, list[torch.fx.Node]]" = OrderedDict()
    cache: dict[str, str | None] = {}
    for node in nodes:
        path = path_of(node)
        if not path:
            continue
        if path not in cache:
            parts = path.split(".")
            cache[path] = next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                                if match(".".join(parts[:i]))), None)
        key = cache[path]
        if key is not None:
            regions.setdefault(key, []).append(node)
    return regions


def region_inputs_outputs(nodes) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """(inputs, outputs) of a node set, each in graph order.

    inputs: nodes outside the set that nodes in the set read; outputs: nodes in the set
    read by nodes outside it (including the graph's output node).
    """
    inside = set(nodes)
    order = {n: i for i, n in enumerate(next(iter(inside)).graph.nodes)} if inside else {}
    inputs, outputs = set(), set()
    for n in inside:
        for a in n.all_input_nodes:
            if a not in inside:
                inputs.add(a)
        if any(u not in inside for u in n.users):
            outputs.add(n)
    return sorted(inputs, key=order.__getitem__), sorted(outputs, key=order.__getitem__)


def convexity_violation(nodes: list[torch.fx.Node], order: dict) -> tuple | None:
    """(node, outside_input) where a path leaves the set and comes back into it (outlining
    would create a cycle), or None when the set (graph order) is convex.

    A node outside the set, between first and last, that depends on the set and that the
    set depends on makes the set non-convex. Forward pass: which outside nodes depend on the
    set; then check whether any set node reads one of them."""
    inside = set(nodes)
    first, last = order[nodes[0]], order[nodes[-1]]
    tainted: set = set()
    for n in nodes[0].graph.nodes:
        i = order[n]
        if i < first:
            continue
        if i > last:
            break
        if n in inside:
            bad = next((a for a in n.all_input_nodes if a in tainted), None)
            if bad is not None:
                return n, bad
        elif any(a in inside or a in tainted for a in n.all_input_nodes):
            tainted.add(n)
    return None


def _check_convex(nodes: list[torch.fx.Node], order: dict) -> None:
    v = convexity_violation(nodes, order)
    if v is not None:
        n, bad = v
        raise PassError(f"cannot outline: region is not convex; {n.format_node()} reads "
                        f"{bad.format_node()}, which is outside the region and depends on it")


def _safe_name(gm: torch.nn.Module, name: str) -> str:
    base = re.sub(r"\W", "_", name) or "region"
    if base[0].isdigit():
        base = "_" + base
    cand, k = base, 1
    if hasattr(gm, cand):
        base = cand = base + "_region"
    while hasattr(gm, cand):
        cand = f"{base}_{k}"
        k += 1
    return cand


def _val_of(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def borrowed_modules(child: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules an outlined child calls but does not own (name in the child -> module)."""
    return dict(getattr(child, "_memfit_borrowed", {}))


def outline_region(gm: torch.fx.GraphModule, nodes, name: str) -> torch.fx.Node:
    """Move `nodes` (a convex set of compute nodes of `gm.graph`) into a child GraphModule.

    The child is registered on `gm` as `name` (made a valid, unused attribute name) and the
    nodes are replaced by one `call_module` node whose arguments are the region's inputs
    (including `get_attr` parameter nodes, which stay in the parent). A region with one
    output returns it; with several, a tuple, unpacked in the parent by `getitem` nodes.
    Modules the region calls (`call_module`) are borrowed from `gm`, not re-registered, so
    `gm.state_dict()` keeps its keys. Mutates `gm` (graph and attributes) and recompiles it;
    returns the new call node (`node.meta[REGION_META]` names the region).
    """
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = list(dict.fromkeys(nodes))
    if not nodes:
        raise PassError(f"cannot outline region {name!r}: no nodes")
    for n in nodes:
        if n not in order:
            raise PassError(f"cannot outline region {name!r}: {n.format_node()} is not in this graph")
        if n.op not in _COMPUTE_OPS:
            raise PassError(f"cannot outline region {name!r}: {n.format_node()} is a {n.op} node; "
                            "only call_function, call_method and call_module nodes can be outlined")
    nodes.sort(key=order.__getitem__)
    inside = set(nodes)
    _check_convex(nodes, order)
    inputs, outputs = region_inputs_outputs(nodes)
    if not outputs:
        raise PassError(f"cannot outline region {name!r}: nothing outside the region reads its nodes")

    # -- child graph: placeholders for inputs, copies of the nodes, outputs ------------------
    attr_name = _safe_name(gm, name)
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    used_names: set[str] = set()
    for a in inputs:
        ph = sub.placeholder(a.name)
        ph.meta = {k: v for k, v in a.meta.items() if k in ("val", "tensor_meta")}
        env[a] = ph
        used_names.add(a.name)
    borrowed: dict[str, torch.nn.Module] = {}
    target_map: dict[str, str] = {}
    for n in nodes:
        new = sub.node_copy(n, lambda x: env[x])
        # per-node costs described the node in the parent's step; inside the child they
        # would be stale (a wrapper such as checkpointing changes what is saved)
        new.meta.pop("memfit", None)
        if n.op == "call_module":
            tgt = str(n.target)
            if tgt not in target_map:
                local = re.sub(r"\W", "_", tgt)
                while local in target_map.values():
                    local += "_"
                target_map[tgt] = local
                borrowed[local] = gm.get_submodule(tgt)
            new.target = target_map[tgt]
        env[n] = new
    if len(outputs) == 1:
        sub.output(env[outputs[0]])
    else:
        sub.output(tuple(env[o] for o in outputs))

    holder = torch.nn.Module()
    for local, mod in borrowed.items():
        holder.add_module(local, mod)
    child = torch.fx.GraphModule(holder, sub, class_name=f"Region_{attr_name}")
    # Borrow instead of own: take the modules out of _modules so neither the child's nor
    # the parent's state_dict/parameters() lists them a second time; plain attribute lookup
    # (the generated code's `self.<local>`) still finds them in __dict__.
    for local, mod in borrowed.items():
        del child._modules[local]
        child.__dict__[local] = mod
    child.__dict__["_memfit_borrowed"] = dict(borrowed)
    gm.add_module(attr_name, child)

    # -- parent: one call node where the last region node was ----------------------------
    last = nodes[-1]
    with graph.inserting_after(last):
        call = graph.call_module(attr_name, tuple(inputs))
    vals = [_val_of(o) for o in outputs]
    call.meta["val"] = vals[0] if len(outputs) == 1 else tuple(vals)
    call.meta[REGION_META] = {"name": attr_name, "nodes": len(nodes)}
    stack = _common_stack(nodes)
    if stack:
        call.meta["nn_module_stack"] = stack
    replacements: dict[torch.fx.Node, torch.fx.Node] = {}
    if len(outputs) == 1:
        replacements[outputs[0]] = call
    else:
        cursor = call
        for i, o in enumerate(outputs):
            with graph.inserting_after(cursor):
                g = graph.call_function(operator.getitem, (call, i))
            g.meta = {k: v for k, v in o.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")}
            replacements[o] = g
            cursor = g

    # Outside nodes interleaved with the region that read its outputs must follow the call.
    first_i, last_i = order[nodes[0]], order[last]
    moved = [n for n in graph.nodes if first_i < order.get(n, -1) < last_i and n not in inside]
    tainted: set = set()
    anchor = list(replacements.values())[-1]
    for n in moved:
        if any(a in inside or a in tainted for a in n.all_input_nodes):
            tainted.add(n)
            anchor.append(n)
            anchor = n

    for o, r in replacements.items():
        o.replace_all_uses_with(r, delete_user_cb=lambda u: u not in inside)
    for n in reversed(nodes):
        graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return call


def _common_stack(nodes):
    """The longest nn_module_stack prefix shared by all nodes (for module attribution)."""
    stacks = [list(n.meta.get("nn_module_stack", {}).items()) for n in nodes]
    if not stacks or not all(stacks):
        return None
    common = stacks[0]
    for s in stacks[1:]:
        k = 0
        while k < min(len(common), len(s)) and common[k][0] == s[k][0]:
            k += 1
        common = common[:k]
    return dict(common) if common else None
