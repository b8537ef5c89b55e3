"""The planner's decisions about gradients (memfit.planning.strategy calls them): a tied
embedding's gradient as sparse rows (sparse-embedding-grad), and the optimizer step in
backward, taken greedily when it lowers the peak, else tried again with the ladder."""

from __future__ import annotations

import dataclasses

from memfit.planning.techniques import TECHNIQUES


def sparse_embedding_grad(cap, gm, peak: int, ctx, verify: bool):
    """sparse-embedding-grad on `gm` unless it raises the predicted peak: (gm, peak, decisions).
    At an equal peak it is taken too: it costs no time, and the peak it lowers, the end of
    backward, is where the later rungs (the step in backward, smaller states) move it."""
    from memfit.cost_models.memory import analyze_step
    from memfit.ir.fx_utils import copy_graph_module
    from memfit.memory_plan import Decision
    from memfit.passes.infra.manager import PassManager
    from memfit.passes.infra.registry import get_pass

    p = get_pass(TECHNIQUES["sparse_embedding_grad"])()
    res = PassManager([p], verify=verify).run(copy_graph_module(gm), ctx)
    if not res.modified:
        return gm, peak, []
    a = analyze_step(dataclasses.replace(cap, gm=res.gm), optimizer=ctx.optimizer, loss_fn=ctx.loss_fn,
                     symbolic=False)
    if a.peak_bytes > peak:
        return gm, peak, []
    n = res.stats.get(f"{p.name}.rewritten", 0)
    return res.gm, a.peak_bytes, [Decision("(gradients)", p.name, peak - a.peak_bytes, 0.0,
                                           f"{n} tied embedding lookup(s) with a sparse weight gradient, added in "
                                           "place into the dense one (no weight-sized temporary at the end of "
                                           "backward; exact to rounding)")]


def fused_step(cap, gm, peak: int, ctx):
    """The optimizer step in backward when it lowers the predicted peak: (peak, decisions);
    sets ctx.optimizer to the StepInBackward. When it does not lower it yet (the peak is before
    the gradients exist), fit_budget tries the ladder again with it (`fused_variant`)."""
    from memfit.cost_models.memory import analyze_step
    from memfit.memory_plan import Decision
    from memfit.runtime.optim import StepInBackward, why_not

    opt = ctx.optimizer
    if isinstance(opt, StepInBackward):
        return peak, []
    why = why_not(opt)
    if why is not None:
        return peak, [Decision("(gradients)", "kept", 0, 0.0, f"step in backward not applicable: {why}")]
    fused = StepInBackward(opt)
    new_peak = analyze_step(dataclasses.replace(cap, gm=gm), optimizer=fused, loss_fn=ctx.loss_fn,
                            symbolic=False).peak_bytes
    if new_peak >= peak:
        return peak, []
    ctx.optimizer = fused
    return new_peak, [fused_decision(opt, peak - new_peak)]


def fused_decision(opt, saved: int, why: str = ""):
    from memfit.memory_plan import Decision

    return Decision("(gradients)", "step-in-backward", saved, 0.0,
                    f"{type(opt).__name__} steps each parameter as its gradient is ready; the loop must not clip, "
                    f"accumulate or read gradients (optimizer.step() is a no-op){why}")


def fused_variant(cap, gm, ctx):
    """(context stepping in backward, its predicted peak, decision) for the ladder's second pass,
    or None when the step in backward does not apply or is taken already."""
    from memfit.cost_models.memory import analyze_step
    from memfit.runtime.optim import StepInBackward, why_not

    opt = ctx.optimizer
    if opt is None or isinstance(opt, StepInBackward) or why_not(opt) is not None:
        return None
    fused = StepInBackward(opt)
    a = analyze_step(dataclasses.replace(cap, gm=gm), optimizer=fused, loss_fn=ctx.loss_fn, symbolic=False)
    return dataclasses.replace(ctx, optimizer=fused), a.peak_bytes, fused_decision(
        opt, 0, "; taken with the techniques below, which move the peak to where the gradients are")
