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
    measured = {}
    failed_at = None
    for pct in (100, 85, 70, 60, 50, 40, 30, 20):
        try:
            p = planner.plan(f"{pct}%")
        except BudgetError as e:
            assert "lowest predicted peak" in str(e)
            failed_at = failed_at or pct
            continue
        assert failed_at is None, f"{pct}% planned although {failed_at}% could not be"
        # a plan already measured at a looser budget is not run again: two runs of one graph can
        # differ by a few KiB on 2 threads (worker threads' scratch overlapping or not), and the
        # sweep compares plans, not that noise
        key = (p.peak_bytes, tuple(map(str, p.spans)))
        if key not in measured:
            measured[key] = measure(OptimizedModule(model, cap, p.gm), example_inputs=inputs).peak_bytes
        rows.append((pct, p.budget_bytes, p.peak_bytes, measured[key], len(p.spans), p.extra_time_s))
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


def test_floor_is_the_lowest_plan_and_the_same_at_every_refused_budget():
    # a 2-layer GPT-2-like model where the frontier's most-recomputing plan is not its lowest
    from examples.gpt2_like import loss_fn, make

    torch.manual_seed(0)
    model, inputs = make(layers=2, batch_size=8, seq_len=256, d=128, vocab=1024)
    cap = capture(model, inputs, dynamic=False)
    planner = CheckpointPlanner(cap, optimizer="sgd", loss_fn=loss_fn)
    peaks, refusals = [], set()
    for pct in range(95, 30, -5):
        try:
            peaks.append(planner.plan(f"{pct}%").peak_bytes)
        except BudgetError as e:
            refusals.add(str(e).split("recomputation is ")[1].split(" ")[0])
    floor = planner.floor_bytes()
    assert peaks == sorted(peaks, reverse=True)             # monotone in the budget
    assert all(p >= floor for p in peaks)                    # the stated floor is below every plan found
    assert len(refusals) == 1                                # the same floor at every refused budget
    just_over = int(floor / (1.0 - planner.margin)) + 1     # the budget the refusal names plans
    assert floor <= planner.plan(just_over).peak_bytes <= just_over
