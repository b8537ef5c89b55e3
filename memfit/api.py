"""Public entry points: plan() (and, as passes land, optimize())."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from memfit.budget import Budget
from memfit.ir.capture import capture
from memfit.cost_models.memory import analyze_step
from memfit.errors import BudgetError, PassError
from memfit.memory_plan import MemoryPlan, downsample_timeline, module_rows

log = logging.getLogger(__name__)


def plan(model: torch.nn.Module, budget=None, *, example_inputs=(), example_kwargs: dict | None = None,
         optimizer=None, loss_fn: Callable | None = None, capture_method: str = "auto",
         symbolic: bool = True) -> MemoryPlan:
    """Predict the memory of one training step of `model` (forward, backward, optimizer step).

    Nothing is computed for real: the step runs on FakeTensors. `budget` (bytes, "6GiB",
    "50%") is compared with the predicted peak, and the plan gives the largest batch size
    that fits it. See MemoryPlan for what the plan holds.

    `symbolic`: keep batch size B and sequence length T symbolic, so the plan gives bytes as
    expressions in them and the largest batch that fits. False is faster (GPT-2-small:
    about 2 s instead of 7 s on a 2-core CPU) and gives the same bytes at the example size.
    """
    budget_obj = Budget.parse(budget) if budget is not None else None
    cap = capture(model, example_inputs, example_kwargs, method=capture_method, dynamic=symbolic)
    return plan_captured(cap, budget_obj, optimizer=optimizer, loss_fn=loss_fn, symbolic=symbolic)


def plan_captured(cap, budget: Budget | None, *, optimizer=None, loss_fn=None, symbolic=True,
                  decisions=(), extra_time_s: float = 0.0, baseline_peak: int | None = None) -> MemoryPlan:
    """Plan for an already captured model (passes reuse the capture)."""
    a = analyze_step(cap, optimizer=optimizer, loss_fn=loss_fn, symbolic=symbolic)
    budget_bytes = None
    if budget is not None:
        budget_bytes = budget.resolve(baseline_peak if baseline_peak is not None else a.peak_bytes)
    device = "cpu"
    for p in cap.gm.parameters():
        device = str(p.device)
        break
    opt_name = optimizer if isinstance(optimizer, (str, type(None))) else type(optimizer).__name__
    return MemoryPlan(
        model=cap.model_name, device=device, capture_method=cap.method, optimizer=opt_name,
        peak_bytes=a.peak_bytes, peak_phase=a.peak_phase, categories=dict(a.totals),
        peak_breakdown=dict(a.peak_breakdown), budget=str(budget) if budget is not None else None,
        budget_bytes=budget_bytes, symbols=dict(a.symbols), peak_expr=str(a.peak_expr),
        saved_expr=str(a.saved_expr),
        max_batch=a.max_batch(budget_bytes) if budget_bytes is not None else None,
        flops=a.flops, modules=module_rows(a.nodes.values()), decisions=tuple(decisions),
        predicted_extra_time_s=extra_time_s, timeline=downsample_timeline(a.timeline),
        notes=tuple(a.notes))


def check_budget(plan_: MemoryPlan) -> None:
    """Raise BudgetError when the plan's peak exceeds its budget."""
    if plan_.fits is False:
        from memfit.budget import format_bytes as fb
        raise BudgetError(f"predicted peak {fb(plan_.peak_bytes)} exceeds the budget "
                          f"{plan_.budget} ({fb(plan_.budget_bytes)})")


# ----------------------------------------------------------------------------- optimize

# technique name (DESIGN.md) -> registered pass name
TECHNIQUES = {
    "fuse_conv_bn": "fuse-conv-bn",
    "sdpa": "sdpa-attention",
    "checkpoint": "checkpoint",
    "quantize": "quantize-activations",
    "reversible": "reversible",
    "token_merge": "token-merge",
    "offload": None,  # designed for (DESIGN.md), not built yet
}
DEFAULT_TECHNIQUES = ("fuse_conv_bn", "sdpa", "checkpoint", "quantize")
_STRUCTURAL = ("fuse_conv_bn", "sdpa", "reversible", "token_merge")  # applied before planning


def _techniques(techniques) -> tuple[str, ...]:
    if techniques is None:
        return DEFAULT_TECHNIQUES
    if isinstance(techniques, str):
        techniques = [t.strip() for t in techniques.split(",") if t.strip()]
    out = []
    for t in techniques:
        if t not in TECHNIQUES:
            raise ValueError(f"unknown technique {t!r}; choose from {', '.join(TECHNIQUES)}")
        if TECHNIQUES[t] is None:
            raise ValueError(f"technique {t!r} is not available yet in this version of memfit")
        out.append(t)
    return tuple(out)


def optimize(model: torch.nn.Module, budget=None, *, example_inputs=(), example_kwargs: dict | None = None,
             optimizer=None, loss_fn: Callable | None = None, techniques=None, passes=None,
             mode: str = "train", verify: bool = False):
    """Rewrite `model` so one training step fits `budget`; returns a new module sharing its
    parameters (same state_dict keys and tensors), with the plan as `.memfit_plan`.

    budget: bytes, "6GiB", "800MB", or "50%" of the unoptimized step's predicted peak; None
    applies only the exact structural passes. techniques: which the planner may use (see
    TECHNIQUES; default: exact ones plus 8-bit quantization, which is used only when the exact
    ones cannot meet the budget). passes: an explicit pipeline (text form or Pass objects),
    bypassing the planner. verify: check numerics after every pass (PassManager verify mode).

    Order (docs/architecture.md): structural passes (Conv+BN tune mode, SDPA, and reversible
    coupling or token merging when allowed), then recompute chosen by the checkpoint solver;
    when recompute alone cannot reach the budget, quantized saved activations and recompute
    again. Raises BudgetError when nothing reaches the budget, with the floor.
    The user's model is not modified.
    """
    import dataclasses

    from memfit.memory_plan import Decision
    from memfit.ir.module import OptimizedModule
    from memfit.passes import PassContext, PassManager, get_pass

    if mode != "train":
        raise ValueError(f"mode={mode!r}: only mode='train' is supported (memory of a training step)")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    budget_obj = Budget.parse(budget) if budget is not None else None
    allowed = _techniques(techniques)
    cap = capture(model, tuple(example_inputs), example_kwargs, dynamic=False)
    base = analyze_step(cap, optimizer=optimizer, loss_fn=loss_fn, symbolic=False)
    budget_bytes = budget_obj.resolve(base.peak_bytes) if budget_obj is not None else None
    ctx = PassContext(captured=cap, budget=budget_bytes, optimizer=optimizer, loss_fn=loss_fn,
                      config={"model": model})  # passes that rewrite the source module (token-merge)
    decisions: list = []
    gm = cap.gm

    if passes is not None:
        res = PassManager(passes, verify=verify).run(gm, ctx)
        gm = res.gm
        for k, v in res.stats.items():
            decisions.append(Decision(target=k.split(".")[0], action=k.split(".", 1)[-1], saved_bytes=0,
                                      extra_time_s=0.0, detail=f"{v}"))
    else:
        peak = base.peak_bytes
        for t in _STRUCTURAL:
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
            new_peak = analyze_step(dataclasses.replace(cap, gm=gm), optimizer=optimizer, loss_fn=loss_fn,
                                    symbolic=False).peak_bytes
            counts = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in res.stats.items())
            decisions.append(Decision(target="(model)", action=p.name, saved_bytes=peak - new_peak,
                                      extra_time_s=0.0, detail=counts))
            peak = new_peak
        if budget_bytes is not None and peak > budget_bytes:
            gm, more = _fit_budget(cap, gm, budget_bytes, peak, allowed, ctx, verify)
            decisions.extend(more)
    extra = sum(d.extra_time_s for d in decisions)
    new_cap = dataclasses.replace(cap, gm=gm)
    plan_ = plan_captured(new_cap, budget_obj, optimizer=optimizer, loss_fn=loss_fn, symbolic=False,
                          decisions=decisions, extra_time_s=extra, baseline_peak=base.peak_bytes)
    check_budget(plan_)
    return OptimizedModule(model, new_cap, gm, plan_)


def _fit_budget(cap, gm, budget_bytes: int, peak: int, allowed, ctx, verify):
    """Meet the budget: recompute alone (exact) if it can; else 8-bit saved activations
    alone; else recompute plans from the frontier (least extra time first) with the saved
    tensors left outside recomputed regions quantized. Returns (gm, decisions).

    Quantization runs after checkpointing, so it wraps only what stays saved: inside a
    recomputed region nothing is kept, and quantizing there would only add work. On each
    graph, 8 bits on every eligible saved tensor is simulated first; where that fits, only
    the shortest prefix of tensors ranked by bytes saved that still meets the budget is
    quantized (memfit/quant_select.py, at most 6 simulations per graph).
    """
    import dataclasses

    from memfit.budget import format_bytes
    from memfit.memory_plan import Decision
    from memfit.passes import get_pass

    planner = None
    first_error = None
    if "checkpoint" in allowed:
        from memfit.passes.checkpoint import CheckpointPlanner
        planner = CheckpointPlanner(dataclasses.replace(cap, gm=gm), optimizer=ctx.optimizer, loss_fn=ctx.loss_fn)
        try:
            cp = planner.plan(budget_bytes)
            return cp.gm, list(cp.decisions)
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

    from memfit.passes.checkpoint import _copy_graph_module, apply_spans
    from memfit.planning.quantize import select_quantized

    def pass_ctx(g):
        return dataclasses.replace(ctx, captured=dataclasses.replace(cap, gm=g), history=[])

    def decision(target, ch, before):
        return Decision(target, q.to_text(), before - ch.peak, ch.extra_time_s, ch.detail())

    # The pass rewrites in place, so every trial gets a fresh graph. Without recompute: a copy
    # of `gm`. With recompute: the checkpoint plan applied again (a graph with outlined regions
    # cannot be copied by _copy_graph_module: the copy keeps only the submodules its own graph
    # names).
    ch = select_quantized(q, lambda: _copy_graph_module(gm), budget_bytes, peak, cap, pass_ctx,
                          ctx.optimizer, ctx.loss_fn, verify=verify)
    if ch.fits:
        return ch.gm, [decision("(model)", ch, peak)]
    best = ch.peak
    if planner is not None:
        frontier = [p for p in planner.frontier if p.spans]
        # At most 6 checkpoint plans, spread over the frontier from the fastest plan to the
        # floor; for each, 8 bits on everything that stays saved first, and the shortest
        # prefix of tensors only on the first plan where that fits.
        picks = sorted({round(i * (len(frontier) - 1) / 5) for i in range(6)}) if frontier else []
        for i in picks:
            spans = frontier[i].spans
            ck_peak, ckgm = planner.simulate(spans)
            planner._sim.pop(spans, None)  # noqa: SLF001 - ckgm is quantized in place below
            graphs = iter([ckgm])

            def fresh(spans=spans, graphs=graphs):
                g = next(graphs, None)
                return g if g is not None else apply_spans(planner.cap.gm, planner.units, spans)[0]

            ch = select_quantized(q, fresh, budget_bytes, ck_peak, cap, pass_ctx, ctx.optimizer, ctx.loss_fn,
                                  verify=verify)
            best = min(best, ch.peak)
            if ch.fits:
                return ch.gm, planner.decisions_for(spans) + [
                    decision("(outside recomputed regions)", ch, ck_peak)]
    if planner is not None:
        best = min(best, planner.floor_bytes())  # recompute alone can go lower than with 8-bit
    raise BudgetError(
        f"the budget {format_bytes(budget_bytes)} cannot be met: the lowest predicted peak with "
        f"recomputation and/or 8-bit saved activations is {format_bytes(best)} (unoptimized "
        f"{format_bytes(peak)}). What would lower it: 4- or 2-bit activations "
        f"(passes='quantize-activations{{bits=4}}'), a smaller batch or sequence, a lighter "
        f"optimizer, or a budget of at least {format_bytes(best)}."
        + (f" Recompute alone: {first_error}" if first_error else ""))


def optimize_(model: torch.nn.Module, budget=None, **kwargs) -> torch.nn.Module:
    """In-place variant of optimize(): `model.forward` runs the rewritten graph from now on
    (the model object, its parameters and state_dict stay the same); returns `model`."""
    import types

    opt = optimize(model, budget, **kwargs)
    model.forward = types.MethodType(lambda self, *a, **k: opt(*a, **k), model)
    model.memfit_plan = opt.memfit_plan
    return model
