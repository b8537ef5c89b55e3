import json

import pytest
import torch

import memfit
from memfit.errors import BudgetError
from memfit.memory_plan import Decision, MemoryPlan, ModuleRow, module_rows
from tests.models import Block


@pytest.fixture(scope="module")
def block_plan():
    return memfit.plan(Block(), "8MiB", example_inputs=(torch.randn(4, 32, 64),), optimizer="adamw")


def test_json_round_trip(block_plan):
    text = block_plan.to_json()
    again = MemoryPlan.from_json(text)
    assert again == block_plan
    assert json.loads(text)["fits"] == block_plan.fits


def test_plan_is_immutable(block_plan):
    with pytest.raises(Exception):
        block_plan.peak_bytes = 0


def test_table_has_categories_peak_budget_and_batch(block_plan):
    t = block_plan.format_table(depth=1)
    for word in ("parameters", "gradients", "optimizer_state", "saved_activations", "peak", "budget",
                 "peak(B=4, T=32)" if "T" in block_plan.symbols else "peak(B=4)", "largest batch within budget"):
        assert word in t, word
    # depth controls the module rows: depth 1 has no nested paths, depth 2 shows mlp.0
    assert "mlp.0" not in t and "mlp.0" in block_plan.format_table(depth=2)
    assert block_plan.format_table() == block_plan.format_table()  # stable


def test_fits_flag_against_budget():
    x = (torch.randn(4, 32, 64),)
    big = memfit.plan(Block(), "1GiB", example_inputs=x)
    small = memfit.plan(Block(), 1000, example_inputs=x)
    assert big.fits is True and small.fits is False
    assert "does not fit" in small.format_table()


def test_percentage_budget_is_relative_to_unoptimized_peak():
    p = memfit.plan(Block(), "50%", example_inputs=(torch.randn(4, 32, 64),))
    assert p.budget_bytes == p.peak_bytes // 2 and p.fits is False


def test_malformed_budget_raises_before_any_work():
    with pytest.raises(BudgetError):
        memfit.plan(Block(), "lots", example_inputs=(torch.randn(4, 32, 64),))


def test_module_rows_aggregate_children():
    class R:
        def __init__(self, module, saved):
            self.module, self.saved_bytes, self.output_bytes, self.flops, self.est_time_s = module, saved, 0, 0, 0.0
    rows = {r.path: r for r in module_rows([R("a.b", 5), R("a.c", 7), R("d", 1), R("", 2)])}
    assert rows["a"].saved_bytes == 12 and rows[""].saved_bytes == 15 and rows["a.b"].saved_bytes == 5
    order = [r.path for r in module_rows([R("a.b", 5), R("d", 1), R("a.c", 7)])]
    assert order == ["", "a", "a.b", "a.c", "d"]


def test_decisions_round_trip():
    p = MemoryPlan(model="m", device="cpu", capture_method="export", optimizer=None, peak_bytes=10,
                   peak_phase="backward", categories={}, peak_breakdown={},
                   modules=(ModuleRow("x", 1, 2, 3, 0.5),),
                   decisions=(Decision("h.0", "recompute", 100, 0.001, "segment 0"),))
    assert MemoryPlan.from_json(p.to_json()) == p
    assert "recompute" in p.format_table()
