"""memfit.optimize: sharing with the user's model, budgets, modes, errors."""

import pytest
import torch

import memfit
from memfit.errors import BudgetError
from tests.models import MLP, Block, ConvBN


def _grads(model, out):
    model.zero_grad(set_to_none=True)
    out.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: dict, b: dict) -> float:
    num = sum((a[k] - b[k]).pow(2).sum() for k in a) ** 0.5
    den = sum(b[k].pow(2).sum() for k in b) ** 0.5
    return float(num / den)


def test_result_shares_parameters_and_state_dict_keys():
    m = Block()
    x = torch.randn(2, 16, 64)
    om = memfit.optimize(m, None, example_inputs=(x,))
    sd, osd = m.state_dict(), om.state_dict()
    assert list(sd) == list(osd)
    assert all(sd[k].data_ptr() == osd[k].data_ptr() for k in sd)
    assert {id(p) for p in om.parameters()} == {id(p) for p in m.parameters()}
    assert om.memfit_plan is not None and om.memfit_plan.peak_bytes > 0
    # sdpa-attention replaced the explicit attention: equal up to float rounding
    assert [d.action for d in om.memfit_plan.decisions] == ["sdpa-attention"]
    torch.testing.assert_close(om(x), m(x))


def test_user_model_is_not_modified():
    m = ConvBN()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    om = memfit.optimize(m, "90%", example_inputs=(torch.randn(32, 3, 32, 32),), optimizer="adamw",
                         techniques=["checkpoint"])
    assert any(d.action == "recompute" for d in om.memfit_plan.decisions)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in m.parameters())


def test_eval_mode_runs_the_unmodified_model():
    m = Block(dropout=0.5)
    x = torch.randn(2, 8, 64)
    om = memfit.optimize(m, None, example_inputs=(x,))
    om.eval()
    assert not m.training  # shared modules follow
    torch.testing.assert_close(om(x), m(x))
    om.train()
    assert m.training


def test_optimize_in_place_keeps_the_object():
    m = MLP()
    x = torch.randn(8, 64)
    ref = m(x).detach()
    out = memfit.optimize_(m, None, example_inputs=(x,))
    assert out is m and m.memfit_plan is not None
    torch.testing.assert_close(m(x), ref)


@pytest.mark.parametrize("budget", ["lots", "-5GiB", "150%x"])
def test_malformed_budget_is_a_clear_error(budget):
    with pytest.raises(BudgetError, match="budget"):
        memfit.optimize(MLP(), budget, example_inputs=(torch.randn(4, 64),))


def test_impossible_budget_gives_the_floor():
    m = MLP()
    with pytest.raises(BudgetError, match="(?i)floor|lowest|at least"):
        memfit.optimize(m, 1000, example_inputs=(torch.randn(4, 64),), optimizer="adamw")


def test_unknown_technique_is_rejected():
    with pytest.raises(ValueError, match="unknown technique"):
        memfit.optimize(MLP(), None, example_inputs=(torch.randn(4, 64),), techniques=["magic"])


def test_explicit_pipeline_bypasses_the_planner():
    m = Block()
    x = torch.randn(2, 16, 64)
    om = memfit.optimize(m, None, example_inputs=(x,), passes="outline{pattern=mlp}")
    assert any("mlp" in n for n, _ in om.graph_module.named_children()) or om.memfit_plan.decisions
    torch.testing.assert_close(om(x), m(x))


def _load_example(name):
    import importlib
    return importlib.import_module(f"examples.{name}")


@pytest.mark.parametrize("name,kw,budget", [
    ("gpt2_like", dict(batch_size=8, seq_len=128, layers=2, d=64, heads=4, vocab=256, dropout=0.1), "60%"),
    # small ResNet: convolution scratch in backward (not recomputable) is a third of the peak
    ("resnet_like", dict(batch_size=16, image_size=64, width=8), "80%"),
])
def test_budget_is_met_when_measured_and_gradients_are_exact(name, kw, budget):
    mod = _load_example(name)
    torch.manual_seed(0)
    model, inputs = mod.make(**kw)
    base = memfit.measure(model, example_inputs=inputs, optimizer="sgd", loss_fn=mod.loss_fn)
    om = memfit.optimize(model, budget, example_inputs=inputs, optimizer="sgd", loss_fn=mod.loss_fn,
                         techniques=["checkpoint"])
    p = om.memfit_plan
    assert p.fits and p.budget_bytes < base.peak_bytes
    assert any(d.action == "recompute" for d in p.decisions)
    m = memfit.measure(om, example_inputs=inputs, optimizer="sgd", loss_fn=mod.loss_fn)
    assert m.peak_bytes <= p.budget_bytes, (m.peak_bytes, p.budget_bytes)
    torch.manual_seed(1)
    g_opt = _grads(om, mod.loss_fn(om(*inputs)))
    torch.manual_seed(1)
    g_ref = _grads(model, mod.loss_fn(model(*inputs)))
    assert g_opt.keys() == g_ref.keys()
    assert _rel(g_opt, g_ref) < 1e-5


@pytest.mark.parametrize("techniques", [("checkpoint",), ("checkpoint", "quantize")])
def test_the_refusals_least_budget_is_met_when_asked(techniques):
    """A refusal's 'a budget of at least X', read back as the budget, plans; the recompute
    planner keeps a margin free, so X is above the lowest peak, never below it."""
    import re

    from examples.gpt2_like import loss_fn, make

    torch.manual_seed(0)
    model, inputs = make(layers=2, batch_size=4, seq_len=64, d=64, heads=4, vocab=256)
    kw = dict(example_inputs=inputs, optimizer="adamw", loss_fn=loss_fn, techniques=techniques)
    with pytest.raises(BudgetError) as ei:
        memfit.optimize(model, "5%", **kw)
    msg = str(ei.value)
    floor = re.search(r"lowest predicted peak with .*? is ([0-9.]+ [KMG]iB)", msg).group(1)
    least = re.findall(r"a budget of at least ([0-9.]+ [KMG]iB)", msg)[0]
    om = memfit.optimize(model, least.replace(" ", ""), **kw)
    assert om.memfit_plan.fits
    size = lambda text: memfit.Budget.parse(text.replace(" ", "")).resolve(0)   # noqa: E731
    assert size(least) >= size(floor)


def test_a_parameter_replaced_after_optimize_is_refused_not_left_untrained():
    """The graph reads the Parameter objects it captured: `m.weight = nn.Parameter(...)` or
    load_state_dict(assign=True) after optimize used to leave the graph training the old
    ones. Loading in place still works."""
    import memfit
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(4, 8)
    om = memfit.optimize(model, None, example_inputs=(x,))
    model.load_state_dict({k: v * 2 for k, v in model.state_dict().items()})        # in place: fine
    torch.testing.assert_close(om(x), model(x))
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    with pytest.raises(memfit.MemfitError, match=r"parameter '0\.weight' was replaced after memfit\.optimize"):
        om(x)


def test_on_unmet_lowest_gives_the_lowest_plan_and_says_so():
    """An option to ask for the best achievable plan instead of an error: the plan made for the
    refusal's least budget, measured within it, with `fits` False and a note naming both."""
    from examples.gpt2_like import loss_fn, make

    torch.manual_seed(0)
    model, inputs = make(layers=2, batch_size=4, seq_len=64, d=64, heads=4, vocab=256)
    kw = dict(example_inputs=inputs, optimizer="adamw", loss_fn=loss_fn)
    with pytest.raises(BudgetError) as ei:
        memfit.optimize(model, "5%", techniques="checkpoint", **kw)     # recompute alone: a quick refusal
    least = ei.value.least_budget
    assert least is not None
    om = memfit.optimize(model, "5%", on_unmet="lowest", techniques="checkpoint", **kw)
    plan = om.memfit_plan
    assert plan.fits is False and plan.peak_bytes <= least
    assert "cannot be met; planned for the least budget that can be" in plan.notes[0]
    m = memfit.measure(om, **kw)
    assert m.peak_bytes <= least
    with pytest.raises(ValueError, match="on_unmet"):
        memfit.optimize(model, "5%", on_unmet="best", **kw)
