"""Checkpoint budgets: measured peak within the budget, monotone sweep, floor errors."""

import pytest
import torch

from memfit.ir.capture import capture
from memfit.errors import BudgetError
from memfit.cost_models.measure import measure
from memfit.ir.module import OptimizedModule
from memfit.passes.checkpoint import CheckpointPlanner, plan_checkpoint
from tests.test_checkpoint import Stack


def test_budget_sweep_monotone_and_measured_within_budget():
    torch.manual_seed(0)
    model, inputs = Stack(4, 32), (torch.randn(8, 32, 32),)
    cap = capture(model, inputs)
    planner = CheckpointPlanner(cap)     # one analysis, simulations cached across budgets
    rows = []
    failed_at = None
    for pct in (100, 85, 70, 60, 50, 40, 30, 20):
        try:
            p = planner.plan(f"{pct}%")
        except BudgetError as e:
            assert "lowest predicted peak" in str(e)
            failed_at = failed_at or pct
            continue
        assert failed_at is None, f"{pct}% planned although {failed_at}% could not be"
        m = measure(OptimizedModule(model, cap, p.gm), example_inputs=inputs)
        rows.append((pct, p.budget_bytes, p.peak_bytes, m.peak_bytes, len(p.spans), p.extra_time_s))
    assert failed_at is not None, "some budget in the sweep should be under the floor"
    assert len(rows) >= 4, rows
    assert any(r[4] for r in rows), "no budget made the pass recompute anything"
    for (pct, budget, pred, meas, *_), nxt in zip(rows, rows[1:] + [None]):
        assert pred <= budget, (pct, pred, budget)
        assert meas <= budget, (pct, meas, budget)
        if nxt is not None:
            assert nxt[2] <= pred and nxt[3] <= meas, (rows,)
            assert nxt[5] >= pred * 0 and nxt[5] >= rows[rows.index(nxt) - 1][5]   # extra time grows


def test_absolute_budget_and_floor_message():
    torch.manual_seed(0)
    model, inputs = Stack(2, 32), (torch.randn(8, 32, 32),)
    cap = capture(model, inputs)
    with pytest.raises(BudgetError) as ei:
        plan_checkpoint(cap, 1000)
    msg = str(ei.value)
    assert "cannot meet the budget 1000 B" in msg and "quantized saved activations" in msg
    assert "smaller batch" in msg
