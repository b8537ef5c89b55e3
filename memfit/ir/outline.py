"""The one outliner: move a set of nodes of a captured graph into a child GraphModule.

Every region-level rewrite builds on it: the `outline` pass (a child called with
`call_module`), checkpointing (the child run by a CheckpointedRegion, a `call_function`
target) and reversible coupling (children run by a ReversibleStack).

Parameters stay owned by the parent, so the parent's `state_dict` keys and tensors do not
change:

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

import operator
import re
from typing import Callable

import torch
import torch.fx

from memfit.errors import PassError
from memfit.ir.fx_utils import COMPUTE_OPS, REGION_META

__all__ = ["borrowed_modules", "checkpoint_region", "convexity_violation", "extract", "outline_region",
           "region_inputs_outputs"]

_KEPT_META = ("val", "tensor_meta")


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


def borrowed_modules(child: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules an outlined child calls but does not own (name in the child -> module)."""
    return dict(getattr(child, "_memfit_borrowed", {}))


def extract(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], inputs: list[torch.fx.Node],
            outputs: list[torch.fx.Node], *, class_name: str = "Region", input_names=None,
            tuple_output: bool = False, borrow: bool = True) -> torch.fx.GraphModule:
    """A child GraphModule computing `outputs` from `inputs` with copies of `nodes` (graph order).

    `gm` is not changed. The child's placeholders are `inputs` in the order given (named
    `input_names` when given); it returns the one output, or a tuple when there are several
    or `tuple_output` is set. Modules the nodes call are borrowed from `gm` (module doc);
    with `borrow=False` the child registers them (for a child that is never registered on
    `gm` and whose `parameters()` must list theirs, as a ReversibleStack's blocks).
    """
    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, a in enumerate(inputs):
        ph = sub.placeholder(input_names[i] if input_names else a.name)
        ph.meta = {k: v for k, v in a.meta.items() if k in _KEPT_META}
        env[a] = ph
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
    if len(outputs) == 1 and not tuple_output:
        sub.output(env[outputs[0]])
    else:
        sub.output(tuple(env[o] for o in outputs))

    holder = torch.nn.Module()
    for local, mod in borrowed.items():
        holder.add_module(local, mod)
    child = torch.fx.GraphModule(holder, sub, class_name=class_name)
    if not borrow:
        return child
    # Borrow instead of own: take the modules out of _modules so neither the child's nor
    # the parent's state_dict/parameters() lists them a second time; plain attribute lookup
    # (the generated code's `self.<local>`) still finds them in __dict__.
    for local, mod in borrowed.items():
        del child._modules[local]
        child.__dict__[local] = mod
    child.__dict__["_memfit_borrowed"] = dict(borrowed)
    return child


def outline_region(gm: torch.fx.GraphModule, nodes, name: str, *,
                   call: Callable | None = None, tuple_output: bool = False,
                   meta: dict | None = None) -> torch.fx.Node:
    """Move `nodes` (a convex set of compute nodes of `gm.graph`) into a child GraphModule
    and replace them with one call node. Mutates `gm` and recompiles it; returns the call node.

    `call` None: the child is registered on `gm` as `name` (made a valid, unused attribute
    name) and called with `call_module`; `node.meta[REGION_META]` names the region.
    Otherwise `call(child, inputs, nodes)` returns the callable a `call_function` node (named
    `name`) runs with the region's inputs, e.g. a CheckpointedRegion around the child.
    The arguments are the region's inputs (including `get_attr` parameter nodes, which stay in
    the parent). One output is returned as is, several (or any, with `tuple_output`) as a
    tuple unpacked by `getitem` nodes. `meta` is added to the call node's meta.
    """
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = list(dict.fromkeys(nodes))
    if not nodes:
        raise PassError(f"cannot outline region {name!r}: no nodes")
    for n in nodes:
        if n not in order:
            raise PassError(f"cannot outline region {name!r}: {n.format_node()} is not in this graph")
        if n.op not in COMPUTE_OPS:
            raise PassError(f"cannot outline region {name!r}: {n.format_node()} is a {n.op} node; "
                            "only call_function, call_method and call_module nodes can be outlined")
    nodes.sort(key=order.__getitem__)
    inside = set(nodes)
    bad = convexity_violation(nodes, order)
    if bad is not None:
        raise PassError(f"cannot outline: region is not convex; {bad[0].format_node()} reads "
                        f"{bad[1].format_node()}, which is outside the region and depends on it")
    inputs, outputs = region_inputs_outputs(nodes)
    if not outputs:
        raise PassError(f"cannot outline region {name!r}: nothing outside the region reads its nodes")

    attr_name = _safe_name(gm, name)
    child = extract(gm, nodes, inputs, outputs, class_name=f"Region_{attr_name}", tuple_output=tuple_output)
    last = nodes[-1]
    with graph.inserting_after(last):
        if call is None:
            gm.add_module(attr_name, child)
            node = graph.call_module(attr_name, tuple(inputs))
            node.meta[REGION_META] = {"name": attr_name, "nodes": len(nodes)}
        else:
            node = graph.create_node("call_function", call(child, inputs, nodes), tuple(inputs), name=attr_name)
    vals = [o.meta.get("val") for o in outputs]
    node.meta["val"] = vals[0] if len(outputs) == 1 and not tuple_output else tuple(vals)
    stack = _common_stack(nodes)
    if stack:
        node.meta["nn_module_stack"] = stack
    node.meta.update(meta or {})
    replacements: dict[torch.fx.Node, torch.fx.Node] = {}
    if len(outputs) == 1 and not tuple_output:
        replacements[outputs[0]] = node
    else:
        cursor = node
        for i, o in enumerate(outputs):
            with graph.inserting_after(cursor):
                g = graph.call_function(operator.getitem, (node, i))
            g.meta = {k: v for k, v in o.meta.items() if k in _KEPT_META + ("nn_module_stack",)}
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
    return node


def checkpoint_region(gm: torch.fx.GraphModule, nodes, name: str, label: str = "", *,
                      selective: bool = False) -> torch.fx.Node:
    """Outline `nodes` into a child run by memfit.runtime.checkpoint.CheckpointedRegion (recomputed
    in backward: non-reentrant torch.utils.checkpoint, RNG replayed, buffer updates once;
    `selective`: the outputs of matmuls, convolutions and attention are kept, the rest is
    recomputed). The call node gets `meta["memfit_checkpoint"] = label`; returns it."""
    from memfit.runtime.checkpoint import CheckpointedRegion

    def run(child, inputs, region_nodes):
        return CheckpointedRegion(child, name, *_mutated_state(gm, region_nodes, inputs), selective=selective)

    return outline_region(gm, nodes, name, call=run, tuple_output=True, meta={"memfit_checkpoint": label or name})


def _mutated_state(gm, region, inputs):
    """Module buffers and input indices the region may update in place (BatchNorm running
    statistics and counters, arguments written by in-place ops)."""
    from torch.nn.modules.batchnorm import _NormBase

    module_buffers = []
    mutable: set[int] = set()
    index = {a: i for i, a in enumerate(inputs)}
    for n in region:
        if n.op == "call_module":
            for mod in gm.get_submodule(str(n.target)).modules():
                if isinstance(mod, _NormBase):
                    module_buffers.extend((mod, b) for b in mod._buffers)  # noqa: SLF001
            continue
        if n.op != "call_function":
            continue
        written = []
        schema = getattr(n.target, "_schema", None)
        if schema is not None:
            for k, arg in enumerate(schema.arguments):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    written.append(n.args[k] if k < len(n.args) else n.kwargs.get(arg.name))
        tname = getattr(n.target, "__name__", str(n.target))
        if "batch_norm" in tname or "instance_norm" in tname:
            # aten.batch_norm / F.batch_norm update running_mean, running_var (args 3, 4)
            written += [n.args[k] for k in (3, 4) if k < len(n.args)]
            written += [n.kwargs.get(k) for k in ("running_mean", "running_var")]
        for w in written:
            if isinstance(w, torch.fx.Node) and w in index:
                mutable.add(index[w])
    return module_buffers, sorted(mutable)



def _safe_name(gm: torch.nn.Module, name: str) -> str:
    """`name` made a valid attribute name that `gm` does not use yet."""
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
