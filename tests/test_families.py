"""Fifteen transformers families memfit's authors did not write (examples/hf_families.py, small
configs, each computing its own loss from `labels=`): symbolic plans, and returned plans that
hold when measured."""

import pytest
import torch

import memfit

pytest.importorskip("transformers")
from examples import hf_families as F  # noqa: E402

pytestmark = pytest.mark.transformers


def build(name, **kw):
    torch.manual_seed(0)
    return getattr(F, name)(**kw)


@pytest.mark.parametrize("name,budget", [("llama", "80%"), ("t5", "80%")])
def test_returned_plans_fit_when_measured(name, budget):
    """Every returned plan's measured peak is within its budget, and the prediction within
    0.05% of it. Before: Llama at 80% and T5 at 80% were measured over their budgets (by 3.9
    and 6.1 KB): checkpoint's saved RNG states were not counted, nor logsumexp's scratch in the
    chunked loss (one chunk of logits)."""
    model, args, kwargs = build(name)
    om = memfit.optimize(model, budget, example_inputs=args, example_kwargs=kwargs, optimizer="adamw")
    plan = om.memfit_plan
    assert plan.decisions, "the budget needs the planner"
    m = memfit.measure(om, example_inputs=args, example_kwargs=kwargs, optimizer="adamw")
    assert m.peak_bytes <= plan.budget_bytes, (m.peak_bytes, plan.budget_bytes)
    assert abs(plan.peak_bytes - m.peak_bytes) <= 5e-4 * m.peak_bytes + 64, (plan.peak_bytes, m.peak_bytes)


def _static_peak(name, batch_size):
    model, args, kwargs = build(name, batch_size=batch_size)
    return memfit.plan(model, example_inputs=args, example_kwargs=kwargs, optimizer="adamw", symbolic=False).peak_bytes


def test_symbolic_plan_of_t5_and_its_largest_batch():
    """T5 and BART crashed the default (symbolic) plan with sympy's "Cannot convert symbols to
    int": the labels' length was a symbol of its own, with no name. Now the labels share B and
    T with the ids, and the largest batch the plan gives for a budget is the largest that fits
    when planned at that batch."""
    model, args, kwargs = build("t5")
    p = memfit.plan(model, "150%", example_inputs=args, example_kwargs=kwargs, optimizer="adamw")
    budget = p.budget_bytes
    assert set(p.symbols) == {"B", "T"}
    assert p.max_batch is not None and p.max_batch >= 2
    assert _static_peak("t5", p.max_batch) <= budget < _static_peak("t5", p.max_batch + 1)


def test_symbolic_plan_of_bart_and_gpt2_keep_their_dims():
    """BART (the crash above) and GPT-2 given labels: Hugging Face's causal-LM loss pads the
    labels, and aten's constant_pad_nd specialized B and T to their example values on fake
    tensors, silently; its reference implementation keeps them symbolic."""
    for name in ("bart", "gpt2"):
        model, args, kwargs = build(name)
        p = memfit.plan(model, example_inputs=args, example_kwargs=kwargs, optimizer="adamw")
        assert set(p.symbols) == {"B", "T"}, (name, p.symbols, p.notes)
        assert not [n for n in p.notes if "was fixed" in n]
        assert p.peak_bytes == _static_peak(name, 2)


def test_a_dim_the_step_fixes_is_said():
    """CLIP's contrastive loss builds labels of the batch's size: the batch is fixed while
    simulating the step, and the plan says so instead of giving expressions in B."""
    model, args, kwargs = build("clip")
    p = memfit.plan(model, example_inputs=args, example_kwargs=kwargs, optimizer="adamw")
    assert "B" not in p.symbols and "T" in p.symbols
    assert any("batch size B=4 was fixed while simulating the step" in n for n in p.notes), p.notes
