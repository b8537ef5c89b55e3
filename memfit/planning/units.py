"""Units of a captured forward for the recompute planner: discovery and prices.

Segment discovery cuts the forward (graph order) into units: runs of nodes of the same module
at one depth of the module tree (blocks, attention, MLP); graphs without module structure are
cut at the output's dominators (networkx). Each unit gets its saved bytes, boundary bytes and
recompute time from the cost model's per-node figures (memfit.planning.checkpoint's module
doc; docs/checkpointing.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from memfit.ir.fx_utils import COMPUTE_OPS as _CALL_OPS
from memfit.ir.fx_utils import call_nodes, module_path

__all__ = ["Unit", "block_spans", "discover_runs", "dominator_runs", "module_runs", "price_units"]


@dataclass(frozen=True)
class Unit:
    """A run of consecutive forward nodes (indices into the list of call nodes)."""

    start: int
    end: int                 # exclusive
    label: str               # module path (or node span) for reports
    saved_bytes: int         # saved for backward by its nodes (dropped when recomputed)
    boundary_bytes: int      # inputs kept alive when recomputed that would otherwise be freed
    time_s: float            # forward (= recompute) time estimate
    output_bytes: int = 0    # of saved_bytes, what belongs to values used after the unit


def _module_key(n: torch.fx.Node, depth: int) -> str:
    path = module_path(n)
    return ".".join(path.split(".")[:depth]) if path else ""


def module_runs(nodes: list[torch.fx.Node], depth: int) -> list[tuple[int, int, str]]:
    """Maximal runs of nodes sharing the module path prefix of `depth` components."""
    runs = []
    start = 0
    for i in range(1, len(nodes) + 1):
        if i == len(nodes) or _module_key(nodes[i], depth) != _module_key(nodes[start], depth):
            runs.append((start, i, _module_key(nodes[start], depth) or "(top)"))
            start = i
    return runs


def dominator_runs(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> list[tuple[int, int, str]]:
    """Spans between the output's dominators in the forward data-flow graph (networkx)."""
    import networkx as nx

    g = nx.DiGraph()
    g.add_node("__src__")
    for n in gm.graph.nodes:
        g.add_node(n.name)
        if n.op in ("placeholder", "get_attr"):
            g.add_edge("__src__", n.name)
        for a in n.all_input_nodes:
            g.add_edge(a.name, n.name)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    idom = nx.immediate_dominators(g, "__src__")
    chain = set()
    v = out.name
    while v in idom and idom[v] != v:
        v = idom[v]
        chain.add(v)
    index = {n.name: i for i, n in enumerate(nodes)}
    cuts = sorted(index[c] + 1 for c in chain if c in index)
    runs, start = [], 0
    for c in cuts + [len(nodes)]:
        if c > start:
            runs.append((start, c, f"{nodes[start].name}..{nodes[c - 1].name}"))
            start = c
    return runs


def discover_runs(gm: torch.fx.GraphModule, nodes, *, share: float = 0.25, max_units: int = 64):
    """Units for the chain: module runs, refined where a run holds too much.

    Start from the runs of depth-1 modules; a run holding more than `share` of all saved
    bytes is split into the runs of the next module depth (GPT: `h` -> `h.0`, `h.1`, ...
    -> `h.0.ln_1`, `h.0.attn`, ...), recursively, while the count stays under `max_units`.
    Graphs without module structure are cut at the output's dominators instead.
    """
    if not any(module_path(n) for n in nodes):
        return dominator_runs(gm, nodes)

    def saved(s, e):
        return sum(getattr(n.meta.get("memfit"), "saved_bytes", 0) for n in nodes[s:e])

    total = max(1, saved(0, len(nodes)))
    runs = [(s, e, lab, 1) for s, e, lab in module_runs(nodes, 1)]
    changed = True
    while changed and len(runs) < max_units:
        changed = False
        out = []
        for s, e, lab, d in runs:
            if saved(s, e) > share * total and d < 8 and e - s > 1:
                sub = [(s + a, s + b, l2) for a, b, l2 in module_runs(nodes[s:e], d + 1)]
                deeper = d + 1
                while len(sub) == 1 and deeper < 8:
                    deeper += 1
                    sub = [(s + a, s + b, l2) for a, b, l2 in module_runs(nodes[s:e], deeper)]
                if len(sub) > 1 and len(runs) + len(out) + len(sub) <= max_units + 1:
                    out.extend((a, b, l2, deeper) for a, b, l2 in sub)
                    changed = True
                    continue
            out.append((s, e, lab, d))
        runs = out
    return [(s, e, lab) for s, e, lab, _ in runs]


def price_units(gm: torch.fx.GraphModule, runs) -> list[Unit]:
    """Saved, boundary and time figures per unit from node.meta['memfit'] (NodeCost)."""
    nodes = call_nodes(gm)
    pos = {n: i for i, n in enumerate(nodes)}
    units = []
    for start, end, label in runs:
        inside = set(nodes[start:end])
        saved = out_saved = 0
        time = 0.0
        for n in nodes[start:end]:
            c = n.meta.get("memfit")
            if c is None:
                continue
            time += c.est_time_s
            saved += c.saved_bytes
            if any(u not in inside for u in n.users):
                out_saved += c.saved_bytes
        boundary = 0
        seen = set()
        for n in nodes[start:end]:
            for a in n.all_input_nodes:
                if a in inside or a in seen or a.op not in _CALL_OPS:
                    continue
                seen.add(a)
                c = a.meta.get("memfit")
                if c is None:
                    continue
                # Kept anyway when some operator saves it, or when it is used after the unit.
                last_use = max((pos.get(u, len(nodes)) for u in a.users), default=0)
                if last_use >= end:
                    continue
                boundary += max(0, c.output_bytes - c.saved_bytes)
        units.append(Unit(start, end, label, saved, boundary, time, out_saved))
    return units


def block_spans(units) -> tuple[tuple[int, int], ...]:
    """Spans of units, one per repeated block (`h.0`, `h.1`, ...: the children of one module
    list, found from the units' labels, the parent with the most numbered children), each the
    contiguous units of that block: the plan per-block checkpointing makes. () when the
    units show no repeated blocks or a block's units are not contiguous."""
    import re

    groups: dict[str, dict[str, list[int]]] = {}
    for k, u in enumerate(units):
        m = re.match(r"^(.*?)(?:^|\.)(\d+)(?:\.|$)", u.label)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(m.group(2), []).append(k)
    if not groups:
        return ()
    parent = max(groups, key=lambda p: (len(groups[p]), -len(p)))
    blocks = groups[parent]
    if len(blocks) < 2:
        return ()
    spans = []
    for ks in blocks.values():
        if ks != list(range(ks[0], ks[-1] + 1)):
            return ()
        spans.append((ks[0], ks[-1] + 1))
    spans.sort()
    return tuple(spans) if all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) else ()
