"""memfit's exact structural passes on the torch-level graph Dynamo hands the backend.

They run through the PassManager (memfit.passes.infra.manager) in its `skip_failing` mode: a
pass written for memfit's capture (aten training IR) may not fit Dynamo's graph; it then runs
on a copy, fails, is logged and recorded in the report, and is never half-applied. Only
passes whose promise is "exact" run here.
"""

from __future__ import annotations

import contextlib
import logging

import torch.fx as fx

from memfit.compile.options import BackendOptions
from memfit.compile.report import BackendReport
from memfit.errors import PassError

log = logging.getLogger(__name__)


def _inputs_fake_mode(example_inputs):
    from torch._subclasses.fake_tensor import FakeTensor

    return next((t.fake_mode for t in example_inputs if isinstance(t, FakeTensor)), None)


def _graph_fake_mode(gm: fx.GraphModule):
    from torch._subclasses.fake_tensor import FakeTensor

    for n in gm.graph.nodes:
        v = n.meta.get("val", n.meta.get("example_value"))
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def _expose_example_values(gm: fx.GraphModule, example_inputs) -> None:
    """memfit passes read shapes from node.meta["val"] (the export convention). Where
    Dynamo's example inputs are fake, propagate them through this copy; otherwise (the
    usual case: real inputs) use Dynamo's node.meta["example_value"].
    (node.meta is this copy's own dict: Dynamo's graph is left alone.)"""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        mode = _inputs_fake_mode(example_inputs)
        if mode is not None:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*example_inputs)
            return
    except Exception as e:  # shape propagation is a convenience for the passes
        log.info("memfit backend: fake propagation on Dynamo's graph failed (%s); "
                 "using Dynamo's example values", e)
    for n in gm.graph.nodes:
        if "val" not in n.meta and "example_value" in n.meta:
            n.meta["val"] = n.meta["example_value"]


def run_structural_passes(gm: fx.GraphModule, example_inputs, options: BackendOptions,
                          report: BackendReport) -> fx.GraphModule:
    """`options.passes` on a copy of Dynamo's graph (Dynamo's own graph is left alone)."""
    if not options.passes:
        return gm
    from torch._guards import TracingContext, tracing

    from memfit.ir.fx_utils import copy_graph_module
    from memfit.passes.infra.base import PassContext
    from memfit.passes.infra.manager import PassManager
    from memfit.passes.infra.registry import get_pass, parse_pipeline

    runnable = []
    for spec in options.passes:
        name = spec.split("{", 1)[0].strip()
        try:
            get_pass(name)
            (p,) = parse_pipeline(spec)
        except PassError as e:
            log.info("memfit backend: pass %r skipped: %s", name, e)
            report.passes_skipped.append((name, f"not available: {e}"))
            continue
        if p.promise.kind != "exact":
            report.passes_skipped.append((name, f"promise {p.promise.kind!r}: the backend runs exact passes only"))
            log.info("memfit backend: pass %r skipped: not exact", name)
            continue
        runnable.append(p)
    if not runnable:
        return gm
    work = copy_graph_module(gm)
    _expose_example_values(work, example_inputs)
    ctx = PassContext(budget=options.budget, frontend="dynamo", inputs=list(example_inputs))
    manager = PassManager(runnable, skip_failing=True)
    # Passes find the fake mode with detect_fake_mode, which prefers the tracing context's;
    # make that the mode of the values on this graph.
    mode = _inputs_fake_mode(example_inputs) or _graph_fake_mode(work)
    with (tracing(TracingContext(mode)) if mode is not None else contextlib.nullcontext()):
        res = manager.run(work, ctx)
    report.passes_run.extend(ctx.history)
    report.passes_skipped.extend((text.split("{", 1)[0], why) for text, why in manager.skipped)
    report.diagnostics.extend(res.diagnostics)
    report.pass_stats.update(res.stats)
    return res.gm if ctx.history else gm
