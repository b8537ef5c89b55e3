"""sparse-embedding-grad: the lookup of a tied embedding gives a sparse weight gradient.

A language model whose output projection shares the word-embedding matrix (GPT-2, BERT's
masked-LM head, T5) ends its backward with two (V, D) contributions to that weight in
autograd's buffer: the projection's, and the lookup's dense `embedding_dense_backward`. This
pass turns the lookup into memfit.runtime.embedding.embedding_sparse_grad, whose contribution
is the N looked-up rows, added into the projection's in place: one weight-sized tensor fewer
at the end of backward (BERT-base: 89 MiB). Exact to rounding (the same rows added in another
order where an index repeats).

Rewritten: `aten.embedding` (export graphs) and nn.Embedding calls (symbolic_trace graphs)
whose weight is a parameter that requires grad and that the graph also uses otherwise than by
an embedding lookup (so the summed gradient is dense: torch's Adam refuses sparse ones).
Skipped with a diagnostic: an untied weight, scale_grad_by_freq, max_norm, a weight that is
already sparse, a weight tied only to other lookups, and a weight that is the projection of a
chunked-ce loss: with chunked-ce's gradient, autograd was measured to add the rows out of place,
which the cost model would not see (the sum as predicted in place is 1 (V, D) tensor low).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from memfit.ir.fx_utils import fetch_attr
from memfit.passes.infra.base import Diagnostic, Pass, PassContext, PassResult
from memfit.passes.infra.registry import register_pass
from memfit.runtime.chunked_ce import chunked_linear_cross_entropy
from memfit.runtime.embedding import embedding_sparse_grad

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class SparseEmbeddingGrad(Pass):
    """Tied embedding lookups give sparse weight gradients, added in place into the dense one
    (exact to rounding)."""

    name: ClassVar[str] = "sparse-embedding-grad"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        uses = _parameter_uses(gm)
        stats = {"rewritten": 0, "skipped": 0}
        diags: list[Diagnostic] = []
        for n in list(gm.graph.nodes):
            found = _lookup(gm, n)
            if found is None:
                continue
            weight, ids, padding_idx, why = found
            if why is None:
                others = [u for u in uses.get(id(weight), []) if u is not n]
                if not weight.requires_grad:
                    why = "its weight does not require grad"
                elif not others:
                    why = "its weight is not tied to another use: alone, its gradient would stay sparse"
                elif all(_lookup(gm, u) is not None for u in others):
                    why = "its weight is tied only to other lookups: the summed gradient would stay sparse"
                elif any(u.op == "call_function" and u.target is chunked_linear_cross_entropy for u in others):
                    # measured: with chunked-ce's gradient for the projection, autograd adds the
                    # sparse rows out of place (a new (V, D) tensor), so nothing would be saved
                    why = ("its weight is the projection of a chunked-ce loss, whose gradient autograd does not "
                           "add the rows into in place (measured)")
            if why is not None:
                stats["skipped"] += 1
                diags.append(Diagnostic(self.name, f"embedding lookup left alone: {why}", node=n.name))
                continue
            _rewrite(gm, n, ids, padding_idx)
            stats["rewritten"] += 1
        if stats["rewritten"]:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified=stats["rewritten"] > 0, stats=stats, diagnostics=diags)


def _parameter_uses(gm) -> dict[int, list[torch.fx.Node]]:
    """id(parameter) -> the nodes using it: users of its get_attr nodes, and call_module nodes of
    the module that owns it (a tied weight is one Parameter under two names)."""
    out: dict[int, list] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = fetch_attr(gm, str(n.target))
            if isinstance(t, torch.nn.Parameter):
                out.setdefault(id(t), []).extend(n.users)
        elif n.op == "call_module":
            for p in gm.get_submodule(str(n.target)).parameters(recurse=False):
                out.setdefault(id(p), []).append(n)
    return out


def _lookup(gm, n: torch.fx.Node):
    """(weight, ids node, padding_idx, why not) for an embedding lookup node, else None."""
    if n.op == "call_function" and n.target is aten.embedding.default:
        args = list(n.args) + [None] * 5
        w, ids = args[0], args[1]
        padding_idx = n.kwargs.get("padding_idx", args[2] if args[2] is not None else -1)
        scale = n.kwargs.get("scale_grad_by_freq", args[3] or False)
        sparse = n.kwargs.get("sparse", args[4] or False)
        weight = fetch_attr(gm, str(w.target)) if isinstance(w, torch.fx.Node) and w.op == "get_attr" else None
        if not isinstance(weight, torch.nn.Parameter):
            return None
        why = "scale_grad_by_freq" if scale else "it is sparse already" if sparse else None
        return weight, ids, padding_idx, why
    if n.op == "call_module":
        mod = gm.get_submodule(str(n.target))
        if type(mod) is not torch.nn.Embedding:
            return None
        why = ("scale_grad_by_freq" if mod.scale_grad_by_freq else "max_norm renormalizes the weight in place"
               if mod.max_norm is not None else "it is sparse already" if mod.sparse else None)
        pad = mod.padding_idx if mod.padding_idx is not None else -1
        return mod.weight, n.args[0], pad, why
    return None


def _rewrite(gm, n: torch.fx.Node, ids, padding_idx) -> None:
    graph = gm.graph
    with graph.inserting_before(n):
        if n.op == "call_module":
            w = graph.get_attr(f"{n.target}.weight")
            w.meta = {}
        else:
            w = n.args[0]
        new = graph.call_function(embedding_sparse_grad, (ids, w, padding_idx if padding_idx >= 0 else None))
    new.meta.update(n.meta)
    n.replace_all_uses_with(new)
    graph.erase_node(n)
