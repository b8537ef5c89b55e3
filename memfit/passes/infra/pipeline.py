"""Run a pipeline on a model: source rewrites first, then capture, then the graph passes.

The one runner behind `memfit.optimize(passes=...)`, `memfit opt --passes` and
`memfit.testing.opt_text`. A pipeline's text names both kinds (`token-merge{r=8},checkpoint`);
source rewrites (memfit.passes.infra.base.SourceRewrite) change the nn.Module and always run
before capture, whatever their place in the text, so a graph pass never sees a graph that a
later rewrite would throw away.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from memfit.errors import MemfitError, PassError
from memfit.passes.infra.base import Diagnostic, PassContext, PassResult
from memfit.passes.infra.manager import PassManager
from memfit.passes.infra.registry import as_passes

__all__ = ["apply_rewrites", "run_pipeline", "split_pipeline"]


def split_pipeline(passes) -> tuple[list, list]:
    """(source rewrites, graph passes), each in the pipeline's order."""
    ps = as_passes(passes)
    return [p for p in ps if p.stage == "source"], [p for p in ps if p.stage != "source"]


def apply_rewrites(model, rewrites, example_inputs=(), example_kwargs=None):
    """Apply source rewrites in order. Returns (model, PassResult-like totals without a graph:
    stats prefixed by the rewrite's name, diagnostics, decisions, meta for gm.meta)."""
    total = PassResult(None, modified=False)
    meta: dict = {}
    for r in rewrites:
        try:
            res = r.apply(model, example_inputs, example_kwargs)
        except Exception as e:
            why = str(e) if isinstance(e, MemfitError) else f"{type(e).__name__}: {e}"
            raise PassError(f"pass {r.to_text()!r} failed (source rewrite, before capture): {why}") from e
        model = res.model
        total.modified |= res.modified
        for k, v in res.stats.items():
            total.stats[f"{r.name}.{k}"] = total.stats.get(f"{r.name}.{k}", 0) + v
        total.diagnostics.extend(res.diagnostics)
        total.decisions.extend(res.decisions)
        meta.update(res.meta)
    return model, total, meta


def run_pipeline(model, example_inputs=(), example_kwargs=None, passes="", *, method: str = "auto",
                 dynamic: bool = False, budget=None, optimizer=None, loss_fn=None, verify: bool = False,
                 after_pass: Callable | None = None, captured=None):
    """Apply the pipeline's source rewrites to `model`, capture the result, run its graph passes
    (PassManager, `verify` as there). Returns (Captured of the rewritten graph, PassResult
    totalling both stages: stats keyed `<pass>.<count>`, diagnostics, decisions).
    `captured`: `model` already captured (used when the pipeline has no source rewrite; its
    graph is rewritten in place)."""
    from memfit.ir.capture import capture

    rewrites, graph_passes = split_pipeline(passes)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    model, pre, meta = apply_rewrites(model, rewrites, tuple(example_inputs), example_kwargs)
    if captured is not None and not rewrites:
        cap = captured
    else:
        cap = capture(model, tuple(example_inputs), example_kwargs, method=method, dynamic=dynamic)
    cap.gm.meta.update(meta)
    ctx = PassContext(captured=cap, budget=budget, optimizer=optimizer, loss_fn=loss_fn,
                      history=[r.to_text() for r in rewrites])
    res = PassManager(graph_passes, verify=verify, after_pass=after_pass).run(cap.gm, ctx)
    order = [p.name for p in as_passes(passes)]
    moved = [r.name for r in rewrites if order.index(r.name) > min(
        (order.index(g.name) for g in graph_passes), default=len(order))]
    notes = [Diagnostic(name, "a source rewrite: ran on the module before capture, ahead of the graph passes")
             for name in moved]
    res = PassResult(res.gm, pre.modified or res.modified, {**pre.stats, **res.stats},
                     pre.diagnostics + notes + res.diagnostics, pre.decisions + res.decisions)
    return dataclasses.replace(cap, gm=res.gm), res
