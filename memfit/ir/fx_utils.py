"""fx helpers every stage shares: the module path of a node, size hints of symbolic sizes,
graph copies, attribute lookup and FakeTensor copies of a graph module's state.

One owner each: the cost model, the passes, the planner and the torch.compile backend call
these instead of keeping their own variants.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx

__all__ = ["REGION_META", "call_nodes", "clean_path", "copy_graph_module", "erase_dead", "fake_mode_of",
           "fake_state", "fetch_attr", "is_pure", "run_fake",
           "module_path", "size_hint", "COMPUTE_OPS"]

# node.meta key set on the call node of an outlined region: {"name": str, "nodes": int}
REGION_META = "memfit_region"

COMPUTE_OPS = ("call_function", "call_method", "call_module")

# torch.export marks nodes it created outside any module (mask helpers of transformers, sym_size
# of inputs) with stack keys and paths starting with this; they belong to the top level.
_EXPORT_EMPTY_STACK = "_empty_nn_module_stack"


def size_hint(x) -> int:
    """An int for a size that may be symbolic: the SymInt's hint (its example value)."""
    if isinstance(x, torch.SymInt):
        node = x.node
        if node.hint is not None:
            return int(node.hint)
        from torch.fx.experimental.symbolic_shapes import optimization_hint
        return int(optimization_hint(x, fallback=4096))
    return int(x)


def clean_path(path: str) -> str:
    """'L['self'].transformer.h[0].attn' (Dynamo) or 'transformer.h.0.attn' -> 'transformer.h.0.attn'."""
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for part in path.replace("]", "").replace("[", ".").split("."):
        part = part.strip("'\"")
        if part:
            out.append(part)
    return ".".join(out)


def module_path(node: torch.fx.Node) -> str:
    """Dotted path of the innermost module that produced `node` ('' for the top level).

    Reads `nn_module_stack` (both capture roads record it) and, for `call_module` nodes
    without one, the target. An outlined region's call node is attributed to the modules its
    nodes shared; inside an outlined child, a borrowed module's local target name is not a
    path, so the stack is read first there too.
    """
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_module" and not stack:
        return "" if REGION_META in node.meta else str(node.target)
    if stack:
        entries = [v for k, v in stack.items() if not str(k).startswith(_EXPORT_EMPTY_STACK)]
        if not entries:
            return ""
        last = entries[-1]
        path = clean_path(last[0] if isinstance(last, tuple) else str(last))
    else:
        path = node.meta.get("nn_module_path") or ""
    return "" if path.startswith(_EXPORT_EMPTY_STACK) else path


def call_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The compute nodes of `gm` (call_function, call_method, call_module) in graph order."""
    return [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]


def fetch_attr(obj, target: str):
    """`obj.a.b.c` for target 'a.b.c' (get_attr and call_module targets)."""
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph, sharing parameters, buffers and submodules.

    Node names and `node.meta` (a shallow copy: FakeTensor values are shared, not cloned) are
    kept, so trials can be rewritten (partitioners, passes rewriting in place) while the original
    stays as it was.
    """
    from torch.fx.graph_module import _copy_attr

    with warnings.catch_warnings():  # pytree's LeafSpec deprecation, raised by deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    new = torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    # GraphModule(root, graph) copies only what the graph reads; a parameter or buffer a pass
    # left unread (a causal-mask buffer once SDPA takes is_causal) is still held by the model,
    # and the cost model must count it.
    have = {n for n, _ in new.named_parameters(remove_duplicate=False)} | \
        {n for n, _ in new.named_buffers(remove_duplicate=False)}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in have:
            _copy_attr(gm, new, name)
    return new


def fake_state(module: torch.nn.Module, mode, *, static_shapes: bool = True) -> dict[str, torch.Tensor]:
    """FakeTensors (in `mode`) for the parameters and buffers of `module`, by name.

    Tied tensors (a shared embedding) get one fake, so ties survive; trainable parameters'
    fakes require grad. Run a graph with `torch.nn.utils.stateless._reparametrize_module(module,
    fakes, strict=False)` so in-place updates (BatchNorm's statistics) reach the fakes, never
    the user's tensors.
    """
    by_id: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        f = by_id.get(id(t))
        if f is None:
            f = mode.from_tensor(t.detach(), static_shapes=static_shapes)
            if isinstance(t, torch.nn.Parameter) and t.requires_grad:
                f.requires_grad_(True)
            by_id[id(t)] = f
        out[name] = f
    return out


def fake_mode_of(vals):
    """The FakeTensorMode of the tensors among `vals` (or the tracing context's), else None."""
    from torch._guards import detect_fake_mode
    return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])


def run_fake(mode, fn, *vals):
    """fn(*vals) under `mode` (shape metadata of a node a pass creates); None without a mode."""
    if mode is None:
        return None
    with mode:
        return fn(*vals)


def is_pure(n: torch.fx.Node) -> bool:
    """A node without side effects (no in-place method, no impure op)."""
    if n.op == "call_method":
        return not str(n.target).endswith("_")  # in-place methods have effects
    if n.op != "call_function":
        return False
    return not n.is_impure()


def erase_dead(graph: torch.fx.Graph, nodes) -> None:
    """Erase `nodes` once they have no users, and then the pure nodes only they used
    (placeholders and get_attr nodes stay)."""
    work = list(dict.fromkeys(nodes))
    changed = True
    while changed:
        changed = False
        for n in list(work):
            if getattr(n, "_erased", False):
                work.remove(n)
                continue
            if not n.users:
                inputs = [a for a in n.all_input_nodes if a.op not in ("placeholder", "get_attr")]
                graph.erase_node(n)
                work.remove(n)
                for a in inputs:
                    if not a.users and not getattr(a, "_erased", False) and is_pure(a):
                        work.append(a)
                changed = True
