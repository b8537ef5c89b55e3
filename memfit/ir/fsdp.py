"""memfit under FSDP2: `memfit.fully_shard(om, ...)` shards an optimized module the way
`torch.distributed.fsdp.fully_shard` would shard the model (each unit, then the root), and
splits the rewritten graph at the units' boundaries so FSDP2's gathers, frees and gradient
reductions happen around each unit's part of the graph (memfit.runtime.fsdp).

Units: the model's repeated blocks (memfit.passes.reversible.find_blocks, the owner of block
discovery), or the module paths given. Planning with `data_parallel="fsdp"` keeps every
recomputed region inside one unit (`unit_of`, read by memfit.planning.checkpoint.apply_spans):
a region spanning two units would recompute the first one's part while its parameters are
freed. A module planned without it is checked here, and refused with what to do when one of
its regions spans units.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from memfit.errors import MemfitError
from memfit.ir.fx_utils import COMPUTE_OPS, module_path

__all__ = ["default_units", "fully_shard", "split_at_units", "split_units", "unit_of"]


def default_units(model: torch.nn.Module) -> tuple[str, ...]:
    """The module paths FSDP2 shards as units by default: the model's repeated blocks (the
    children of one nn.ModuleList or nn.Sequential sharing a class, two or more, chosen to hold
    the most parameters; a transformer's layers), in model order; () when it has none. As FSDP2's
    examples do: `fully_shard` on each layer, then on the root."""
    best, best_numel = (), 0
    for path, mod in model.named_modules():
        if not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        groups: dict[type, list] = {}
        for name, child in mod.named_children():
            numel = sum(p.numel() for p in child.parameters())
            if numel:
                groups.setdefault(type(child), []).append((name, numel))
        for members in groups.values():
            numel = sum(k for _, k in members)
            if len(members) >= 2 and numel > best_numel:
                best = tuple(f"{path}.{name}" if path else name for name, _ in members)
                best_numel = numel
    return best


def unit_of(path: str, units) -> str | None:
    """The unit among `units` (module paths) that module `path` belongs to, or None (the root)."""
    for u in units:
        if path == u or path.startswith(u + "."):
            return u
    return None


def split_at_units(region: list, units, path_of=module_path) -> list[list]:
    """`region` (consecutive call nodes) cut where its nodes pass from one unit to another
    (memfit.planning.checkpoint.apply_spans); nodes of no unit stay with their neighbours."""
    if not units:
        return [region]
    pieces, current, owner = [], [], None
    for n in region:
        u = unit_of(path_of(n), units)
        if u is not None and owner is not None and u != owner:
            pieces.append(current)
            current = []
        if u is not None:
            owner = u
        current.append(n)
    pieces.append(current)
    return pieces


def _inner_graphs(gm: torch.fx.GraphModule, n: torch.fx.Node) -> list[torch.fx.GraphModule]:
    """The child graphs a call node runs (an outlined region, a checkpointed region)."""
    t = n.target
    if n.op == "call_module":
        sub = gm.get_submodule(str(t))
        return [sub] if isinstance(sub, torch.fx.GraphModule) else []
    inner = getattr(t, "gm", None)
    return [inner] if isinstance(inner, torch.fx.GraphModule) else []


def node_units(gm: torch.fx.GraphModule, n: torch.fx.Node, units) -> set:
    """The units a top-level call node computes for (the nodes inside it, for a region)."""
    inner = _inner_graphs(gm, n)
    if not inner:
        u = unit_of(module_path(n), units)
        return {u} if u is not None else set()
    out: set = set()
    for sub in inner:
        for m in sub.graph.nodes:
            if m.op in COMPUTE_OPS:
                out |= node_units(sub, m, units)
    return out


def refused_technique(om) -> str | None:
    """Why `om`'s rewritten graph cannot run under FSDP2, or None."""
    from memfit.passes.infra.saved_hooks import HookedRuntime
    from memfit.runtime.optim import StepInBackward
    from memfit.runtime.reversible import ReversibleStack

    if isinstance(getattr(om, "memfit_optimizer", None), StepInBackward):
        return "the optimizer step in backward (it would step on gradients before FSDP2 reduces them)"
    gm = om.graph_module
    parts = [m for _, m in gm.named_modules()] + [n.target for n in gm.graph.nodes if n.op == "call_function"]
    for m in parts:
        if isinstance(m, HookedRuntime):
            return ("saved-tensor hooks (quantized or offloaded saved activations): they would take the parameters "
                    "FSDP2 gathers for activations")
        if isinstance(m, ReversibleStack):
            return "reversible coupling (its backward reconstructs activations across FSDP units)"
    return None


def split_units(om, units) -> list:
    """Rewrite `om`'s graph in place: each unit's nodes become one UnitCall, parameters and
    buffers outside them are read live. Returns the UnitCalls."""
    from memfit.ir.outline import convexity_violation, outline_region
    from memfit.runtime.fsdp import LiveAttr, UnitCall

    gm = om.graph_module
    graph = gm.graph
    owned = {n for n, _ in om.named_parameters(remove_duplicate=False)}
    buffers = {n for n, _ in om.named_buffers(remove_duplicate=False)}
    members: dict[str, list] = {u: [] for u in units}
    for n in graph.nodes:
        if n.op not in COMPUTE_OPS:
            continue
        got = node_units(gm, n, units)
        if len(got) > 1:
            raise MemfitError(
                f"node {n.name} of the rewritten graph computes for FSDP units {', '.join(sorted(got))} at once (a "
                "region recomputed across units): under FSDP2 the first unit's parameters are freed when the "
                "region is recomputed. Plan with memfit.optimize(..., data_parallel='fsdp'), which keeps every "
                "region inside one unit")
        if got:
            members[got.pop()].append(n)
    calls = []
    for u in units:
        nodes = members[u]
        if not nodes:
            continue
        order = {n: i for i, n in enumerate(graph.nodes)}
        nodes.sort(key=order.__getitem__)
        # nodes of no unit (shape arithmetic, views at the top level) between a unit's nodes that
        # read the unit and feed it join it
        while True:
            bad = convexity_violation(nodes, order)
            if bad is None:
                break
            other = node_units(gm, bad[1], units) if bad[1].op in COMPUTE_OPS else set()
            if other or bad[1].op not in COMPUTE_OPS:
                raise MemfitError(f"FSDP unit {u!r}: its nodes are not one contiguous computation ({bad[0].name} "
                                  f"reads {bad[1].name}, which is outside it and depends on it); give units= "
                                  "module paths whose forward is one call each")
            nodes = sorted(set(nodes) | {bad[1]}, key=order.__getitem__)
        unit = om.get_submodule(u)
        made: dict = {}

        def call(child, inputs, region, u=u, unit=unit, made=made):
            slots = []
            for i, a in enumerate(inputs):
                if a.op == "get_attr" and str(a.target) in owned:
                    path = str(a.target)
                    if unit_of(path, [u]) is None:
                        continue   # a root parameter: read live where it is
                    if any(user not in region for user in a.users):
                        raise MemfitError(f"parameter {path!r} of FSDP unit {u!r} is also used outside it; FSDP2 "
                                          "gathers a unit's parameters only around its own forward")
                    slots.append((i, path[len(u) + 1:]))
            made["call"] = UnitCall(unit, u, child, slots)
            made["inputs"] = inputs
            return made["call"]

        node = outline_region(gm, nodes, f"memfit_fsdp_{u}", call=call, tuple_output=True)
        uc = made["call"]
        uc.cloned = frozenset(g.args[1] for g in node.users if g.target is operator.getitem
                              and any(_writes(user, g) for user in g.users))
        skip = {i for i, _ in uc.slots}
        node.args = tuple(a for i, a in enumerate(made["inputs"]) if i not in skip)
        for i in skip:
            a = made["inputs"][i]
            if not a.users:
                graph.erase_node(a)
        calls.append(uc)
    # what stays at the top level reads the optimized module's parameters and buffers when it runs
    for n in list(graph.nodes):
        if n.op != "get_attr":
            continue
        path = str(n.target)
        kind = "parameter" if path in owned else "buffer" if path in buffers else None
        if kind is None:
            continue
        with graph.inserting_before(n):
            live = graph.call_function(LiveAttr(om, path, kind), ())
        live.meta = dict(n.meta)
        n.replace_all_uses_with(live)
        graph.erase_node(n)
    graph.lint()
    gm.recompile()
    _drop_copies(gm, om)
    return calls


def _writes(node: torch.fx.Node, arg: torch.fx.Node) -> bool:
    """Whether `node` writes `arg` in place (an aten overload whose schema writes it, an
    in-place method or operator)."""
    if node.op == "call_method":
        return str(node.target).endswith("_") and bool(node.args) and node.args[0] is arg
    if node.op != "call_function":
        return False
    if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
        return bool(node.args) and node.args[0] is arg
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    for k, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = node.args[k] if k < len(node.args) else node.kwargs.get(a.name)
            if v is arg:
                return True
    return False


def _drop_copies(gm: torch.fx.GraphModule, om) -> None:
    """Take the graph module's own references to the model's parameters away: FSDP2 replaces them
    on the model's modules, and a reference kept here would keep each unsharded original alive."""
    ids = {id(p) for p in om.parameters()}
    users = {id(m) for m in om.modules()}
    for _, mod in gm.named_modules():
        if id(mod) in users or (isinstance(mod, torch.fx.GraphModule) and mod is not gm):
            continue
        for k, p in list(mod._parameters.items()):  # noqa: SLF001
            if p is not None and id(p) in ids:
                del mod._parameters[k]  # noqa: SLF001


def _unplanned_option(om, kwargs) -> str | None:
    """Why a fully_shard keyword would make the step differ from its per-rank plan, or None."""
    mp = kwargs.get("mp_policy")
    if mp is not None:
        dtypes = {p.dtype for p in om.parameters()}
        for field in ("param_dtype", "reduce_dtype", "output_dtype"):
            d = getattr(mp, field, None)
            if d is not None and d not in dtypes:
                return (f"mp_policy's {field}={d} computes or reduces in another dtype than the plan's "
                        f"({', '.join(sorted(str(t) for t in dtypes))}): convert the model to that dtype before "
                        "memfit.optimize instead")
    if kwargs.get("reshard_after_forward", True) is not True:
        return ("reshard_after_forward other than True keeps the units gathered after their forward, where the "
                "plan (FSDP2's default) frees them")
    off = kwargs.get("offload_policy")
    if off is not None and type(off).__name__ != "OffloadPolicy":
        return f"offload_policy={type(off).__name__} keeps the shards on the host"
    return None


def fully_shard(om, *, mesh=None, units=None, **fsdp_kwargs):
    """Shard `om` (the result of memfit.optimize) with FSDP2: `torch.distributed.fsdp.fully_shard`
    on each unit, then on `om` itself; returns `om`. Build the optimizer after this call, over
    `om.parameters()` (the sharded ones), as FSDP2 asks.

    units: module paths to shard as units (default: the plan's, with data_parallel="fsdp", else
    the model's repeated blocks). mesh and the other keyword arguments go to every fully_shard
    call (reshard_after_forward, mp_policy, ...). Raises MemfitError for a graph that cannot
    run sharded (a technique FSDP2 cannot compose with, a region across units)."""
    from memfit.ir.module import OptimizedModule
    from memfit.runtime.fsdp import install_unit_method

    if not isinstance(om, OptimizedModule):
        raise MemfitError(f"memfit.fully_shard takes the module memfit.optimize returned, not a "
                          f"{type(om).__name__}: optimize first (with data_parallel='fsdp'), then shard")
    if getattr(om, "_memfit_fsdp_units", None) is not None:
        raise MemfitError("this module is already sharded by memfit.fully_shard")
    why = refused_technique(om)
    if why is not None:
        raise MemfitError(f"cannot shard with FSDP2: the plan uses {why}. Plan again with "
                          "memfit.optimize(..., data_parallel='fsdp'), which leaves it out")
    why = _unplanned_option(om, fsdp_kwargs)
    if why is not None:
        raise MemfitError(f"memfit.fully_shard: {why}; the per-rank plan does not describe it (docs/distributed.md)")
    try:
        from torch.distributed.fsdp import fully_shard as torch_fully_shard
    except ImportError as e:  # pragma: no cover - a torch build without distributed
        raise MemfitError("memfit.fully_shard needs torch.distributed.fsdp (FSDP2)") from e
    if units is None:
        units = getattr(om._memfit_captured, "fsdp_units", None) or default_units(om)
    units = tuple(units)
    for u in units:
        try:
            om.get_submodule(u)
        except AttributeError as e:
            raise MemfitError(f"FSDP unit {u!r} is not a module of {type(om.original).__name__}") from e
    split_units(om, units)
    for u in units:
        sub = om.get_submodule(u)
        torch_fully_shard(sub, mesh=mesh, **fsdp_kwargs)
        install_unit_method(sub)
    torch_fully_shard(om, mesh=mesh, **fsdp_kwargs)
    object.__setattr__(om, "_memfit_fsdp_units", units)
    object.__setattr__(om, "_memfit_params", None)   # FSDP2 replaces them: that is the point
    return om
