"""Public entry points: plan() (and, as passes land, optimize())."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from memfit.budget import Budget
from memfit.capture import capture
from memfit.cost_models.memory import analyze_step
from memfit.errors import BudgetError
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
