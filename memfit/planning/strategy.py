"""The planner memfit.optimize runs: which techniques, in which order, to meet a budget.

1. Structural passes allowed by `techniques` (memfit.planning.techniques): the exact ones
   (fuse-conv-bn, sdpa-attention) and, when named, reversible coupling; each is kept only if
   it changed the graph and is priced by re-running the analysis (a Decision with the
   predicted bytes saved at the peak).
2. Over budget, the loss first: the output projection and its cross-entropy in chunks
   (chunked-ce, exact; one more matmul of the projection), kept if it lowers the peak. Then,
   when named (it constrains the training loop), the optimizer step in backward (exact: each
   parameter updated and its gradient freed as soon as it is accumulated; `ctx.optimizer`
   becomes the StepInBackward the user gets back). Then recompute alone (exact) when it can
   meet the budget (CheckpointPlanner:
   the fastest frontier plan that fits); else 8-bit saved activations alone; else frontier
   recompute plans (fastest first) with the saved tensors left outside recomputed regions
   quantized. On each graph, 8 bits on every eligible saved tensor is simulated first; where
   that fits, only the shortest prefix of tensors ranked by bytes saved that still meets the
   budget is quantized (memfit.planning.quantize.select_quantized).

Quantization runs after checkpointing, so it wraps only what stays saved: inside a
recomputed region nothing is kept, and quantizing there would only add work.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from memfit.budget import format_bytes
from memfit.errors import BudgetError, PassError
from memfit.planning.techniques import EXACT_STRUCTURAL, TECHNIQUES

log = logging.getLogger(__name__)

# applied before planning, in this order, when allowed (token merging is a source rewrite,
# applied before capture: memfit.api)
STRUCTURAL = EXACT_STRUCTURAL + ("reversible",)


def structural(cap, gm, peak: int, allowed, ctx, *, verify: bool = False):
    """Run each allowed structural pass on `gm` in place; keep it only where it changed the
    graph. Returns (gm, new predicted peak, decisions)."""
    from memfit.cost_models.memory import analyze_step
    from memfit.memory_plan import Decision
    from memfit.passes.infra.manager import PassManager
    from memfit.passes.infra.registry import get_pass

    decisions = []
    for t in STRUCTURAL:
        if t not in allowed:
            continue
        try:
            p = get_pass(TECHNIQUES[t])()
        except Exception as e:  # noqa: BLE001 - a missing optional pass is skipped, said why
            log.info("technique %s skipped: %s", t, e)
            continue
        res = PassManager([p], verify=verify).run(gm, ctx)
        if not res.modified:
            continue
        gm = res.gm
        new_peak = analyze_step(dataclasses.replace(cap, gm=gm), optimizer=ctx.optimizer, loss_fn=ctx.loss_fn,
                                symbolic=False).peak_bytes
        counts = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in res.stats.items())
        decisions.append(Decision(target="(model)", action=p.name, saved_bytes=peak - new_peak,
                                  extra_time_s=0.0, detail=counts))
        peak = new_peak
    return gm, peak, decisions


def fit_budget(cap, gm, budget_bytes: int, peak: int, allowed, ctx, *, verify: bool = False):
    """Meet `budget_bytes` (module doc, step 2). Returns (gm, decisions); BudgetError with the
    floor and what would lower it when no plan fits."""
    from memfit.memory_plan import Decision
    from memfit.passes.infra.registry import get_pass

    decisions: list = []
    entry_peak = peak
    if "chunked_ce" in allowed:
        gm, peak, decisions = _chunked_loss(cap, gm, peak, ctx, verify)
        if peak <= budget_bytes:
            return gm, decisions
    if "step_in_backward" in allowed:
        peak, more = _fused_step(cap, gm, peak, ctx)
        decisions += more
        if peak <= budget_bytes:
            return gm, decisions
    planner = None
    first_error = None
    if "checkpoint" in allowed:
        from memfit.planning.checkpoint import CheckpointPlanner
        planner = CheckpointPlanner(dataclasses.replace(cap, gm=gm), optimizer=ctx.optimizer, loss_fn=ctx.loss_fn)
        try:
            cp = planner.plan(budget_bytes)
            return cp.gm, decisions + list(cp.decisions)
        except BudgetError as e:
            first_error = e
    q = None
    if "quantize" in allowed:
        try:
            q = get_pass(TECHNIQUES["quantize"])()
        except PassError as e:
            log.info("technique quantize skipped: %s", e)
    if q is None:
        if first_error is not None:
            raise first_error
        raise BudgetError(f"predicted peak {format_bytes(peak)} exceeds the budget {format_bytes(budget_bytes)} "
                          f"and neither 'checkpoint' nor 'quantize' is among the allowed techniques "
                          f"{list(allowed)}")

    from memfit.ir.fx_utils import copy_graph_module
    from memfit.planning.quantize import select_quantized

    def pass_ctx(g):
        return dataclasses.replace(ctx, captured=dataclasses.replace(cap, gm=g), history=[])

    def decision(target, ch, before):
        return Decision(target, q.to_text(), before - ch.peak, ch.extra_time_s, ch.detail())

    # The pass rewrites in place, so every trial gets a fresh graph.
    ch = select_quantized(q, lambda: copy_graph_module(gm), budget_bytes, peak, cap, pass_ctx,
                          ctx.optimizer, ctx.loss_fn, verify=verify)
    if ch.fits:
        return ch.gm, decisions + [decision("(model)", ch, peak)]
    best = ch.peak
    if planner is not None:
        frontier = [p for p in planner.frontier if p.spans]
        # At most 6 checkpoint plans, spread over the frontier from the fastest plan to the
        # floor; for each, 8 bits on everything that stays saved first, and the shortest
        # prefix of tensors only on the first plan where that fits.
        picks = sorted({round(i * (len(frontier) - 1) / 5) for i in range(6)}) if frontier else []
        for i in picks:
            spans = frontier[i].spans
            ck_peak, _ = planner.simulate(spans)
            ch = select_quantized(q, lambda spans=spans: planner.fresh_graph(spans), budget_bytes, ck_peak, cap,
                                  pass_ctx, ctx.optimizer, ctx.loss_fn, verify=verify)
            best = min(best, ch.peak)
            if ch.fits:
                return ch.gm, decisions + planner.decisions_for(spans) + [
                    decision("(outside recomputed regions)", ch, ck_peak)]
    if planner is not None:
        best = min(best, planner.floor_bytes())  # recompute alone can go lower than with 8-bit
    raise BudgetError(
        f"the budget {format_bytes(budget_bytes)} cannot be met: the lowest predicted peak with "
        f"recomputation and/or 8-bit saved activations is {format_bytes(best)} (before them "
        f"{format_bytes(entry_peak)}). What would lower it: 4- or 2-bit activations "
        f"(passes='quantize-activations{{bits=4}}'), a smaller batch or sequence, a lighter "
        f"optimizer, or a budget of at least {format_bytes(best)}."
        + (f" Recompute alone: {first_error}" if first_error else ""))


def _chunked_loss(cap, gm, peak: int, ctx, verify: bool):
    """chunked-ce on `gm` when it lowers the predicted peak: (gm, peak, decisions)."""
    from memfit.cost_models.memory import analyze_step
    from memfit.memory_plan import Decision
    from memfit.passes.infra.manager import PassManager
    from memfit.passes.infra.registry import get_pass

    from memfit.ir.fx_utils import copy_graph_module

    p = get_pass(TECHNIQUES["chunked_ce"])()
    res = PassManager([p], verify=verify).run(copy_graph_module(gm), ctx)   # kept only if it helps
    if not res.modified:
        return gm, peak, []
    a = analyze_step(dataclasses.replace(cap, gm=res.gm), optimizer=ctx.optimizer, loss_fn=ctx.loss_fn,
                     symbolic=False)
    if a.peak_bytes >= peak:
        return gm, peak, []
    extra = _projection_time_s(res.gm)
    n = res.stats.get(f"{p.name}.rewritten", 0)
    return res.gm, a.peak_bytes, [Decision("(loss)", p.name, peak - a.peak_bytes, extra,
                                           f"{n} output projection(s) + cross-entropy in chunks of rows")]


def _projection_time_s(gm) -> float:
    """Predicted extra time: the projection's matmul once more (logits recomputed in backward),
    2 * N * D * V FLOPs at the device's rate."""
    from memfit.cost_models.roofline import DeviceSpec
    from memfit.runtime.chunked_ce import chunked_linear_cross_entropy

    dev = next((q.device for q in gm.parameters()), torch.device("cpu"))
    flops = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is chunked_linear_cross_entropy:
            h, w = n.args[0].meta.get("val"), n.args[1].meta.get("val")
            if isinstance(h, torch.Tensor) and isinstance(w, torch.Tensor):
                rows = h.numel() // h.shape[-1]
                flops += 2 * int(rows) * int(w.shape[0]) * int(w.shape[1])
    return flops / DeviceSpec.for_device(dev).flops_per_s


def _fused_step(cap, gm, peak: int, ctx):
    """The optimizer step in backward when it lowers the predicted peak: (peak, decisions);
    sets ctx.optimizer to the StepInBackward."""
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
    return new_peak, [Decision("(gradients)", "step-in-backward", peak - new_peak, 0.0,
                               f"{type(opt).__name__} steps each parameter as its gradient is ready; the loop "
                               "must not clip, accumulate or read gradients (optimizer.step() is a no-op)")]
