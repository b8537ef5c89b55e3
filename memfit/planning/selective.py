"""Operator-level selective recompute: what a unit keeps when recomputed selectively.

A selectively recomputed region (memfit.runtime.checkpoint.CheckpointedRegion with
`selective=True`) keeps the outputs of its matmuls, convolutions and attention
(`SAVED_OPERATORS`, torch's selective activation checkpointing) and recomputes every other
operator in backward: layer norms, activations, softmax, dropout (its mask replayed), copies.
Those are cheap to run again and, in a transformer block, hold most of the saved bytes that
are not matmul outputs, so a selective region gives back part of a region's memory for a
small part of its recompute time. The chain solver (memfit.planning.solvers.chain) chooses,
per span, whole or selective recompute.

The figures come from the simulated step: `NodeCost.kept_bytes` is what the cost model's
tracker saw the node's SAVED_OPERATORS allocate in forward (exactly the storages selective
checkpointing caches), and the seconds of those nodes are what recompute no longer spends.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from memfit.planning.solvers.chain import Selective

__all__ = ["selective_figures", "why_not_selective"]

_PLAIN_MODULES = ("torch.", "operator", "builtins", "_operator", "math")


def _plain_target(n: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """True for a call selective checkpointing replays as it ran: aten operators, torch and
    operator functions, tensor methods, torch.nn leaf modules. Not for custom autograd
    Functions, memfit's runtime calls (nested regions) or other Python callables."""
    if n.op == "call_method":
        return True
    if n.op == "call_module":
        return type(gm.get_submodule(str(n.target))).__module__.startswith("torch.nn")
    t = n.target
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return True
    mod = getattr(t, "__module__", None) or ""
    return mod.startswith(_PLAIN_MODULES) or t in (getattr, operator.getitem)


def _writes_first_argument(n: torch.fx.Node) -> bool:
    """An in-place update of its first argument (add_, masked_fill_, operator.iadd, ...)."""
    if n.op == "call_method":
        return str(n.target).endswith("_") and not str(n.target).startswith("_")
    t = n.target
    schema = getattr(t, "_schema", None)
    if schema is not None:
        return bool(schema.arguments) and schema.arguments[0].alias_info is not None \
            and schema.arguments[0].alias_info.is_write
    name = getattr(t, "__name__", "")
    return (name.startswith("i") and getattr(operator, name, None) is t) or \
        (name.endswith("_") and not name.startswith("_") and n.kwargs.get("inplace", True) is not False)


def _storage_owner(a):
    """The node whose new storage `a` views (through nodes that allocate none)."""
    while isinstance(a, torch.fx.Node):
        c = a.meta.get("memfit")
        if c is None or c.output_bytes > 0 or not a.all_input_nodes:
            return a
        a = a.all_input_nodes[0]
    return a


def _written(gm: torch.fx.GraphModule) -> dict:
    """Nodes whose output storage some node of `gm` updates in place -> that node."""
    out = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method") and n.args and _writes_first_argument(n):
            owner = _storage_owner(n.args[0])
            if isinstance(owner, torch.fx.Node):
                out.setdefault(owner, n)
    return out


def why_not_selective(gm: torch.fx.GraphModule, nodes, written: dict | None = None) -> str | None:
    """Why the nodes of one unit may not be recomputed selectively, or None. `written`:
    `_written(gm)`, when the caller has it."""
    written = _written(gm) if written is None else written
    for n in nodes:
        if not _plain_target(n, gm):
            return f"{n.name} calls {getattr(n.target, '__name__', n.target)!s}, which selective recompute does not replay"
        c = n.meta.get("memfit")
        if c is not None and c.kept_bytes and n in written:
            return f"{written[n].name} updates {n.name}'s output in place, which selective recompute keeps"
    return None


def selective_figures(gm: torch.fx.GraphModule, units) -> Selective:
    """Per unit (memfit.planning.checkpoint.Unit over the call nodes of `gm`, priced by the
    cost model): bytes kept, those used after the unit, those autograd would not have saved,
    the recompute seconds saved, and whether selective recompute applies (memfit.planning.
    solvers.chain.Selective)."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    written = _written(gm)
    kept, kept_out, extra, saved_s, ok = [], [], [], [], []
    for u in units:
        part = nodes[u.start:u.end]
        inside = set(part)
        k = ko = ex = 0
        secs = 0.0
        for n in part:
            c = n.meta.get("memfit")
            if c is None or not c.kept_bytes:
                continue
            k += c.kept_bytes
            ex += max(0, c.kept_bytes - c.saved_bytes)
            secs += c.est_time_s
            if any(x not in inside for x in n.users):
                ko += c.kept_bytes
        kept.append(k)
        kept_out.append(ko)
        extra.append(ex)
        saved_s.append(secs)
        ok.append(k > 0 and why_not_selective(gm, part, written) is None)
    return Selective(kept, kept_out, extra, saved_s, ok)
