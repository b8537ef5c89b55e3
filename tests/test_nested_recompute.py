"""Nested (two-level) recompute: a span of units is one region whose units are regions of
their own; the floor goes below one level of regions, exactly."""

import copy
import dataclasses

import torch

import memfit
from memfit.ir.capture import capture
from memfit.ir.module import OptimizedModule
from memfit.passes.checkpoint import Checkpoint
from memfit.passes.infra.base import PassContext
from memfit.planning.checkpoint import CheckpointPlanner
from memfit.runtime.checkpoint import CheckpointedRegion
from tests.models import BlockStack


def _model(n=12, d=32, p=0.1):
    torch.manual_seed(0)
    m = BlockStack(n=n, d=d)
    for b in m.blocks:
        b.drop.p = p
    return m, torch.randn(4, 128, d)


def _loss(o):
    return o.square().mean()


def test_nested_floor_is_lower_exact_and_predicted():
    model, x = _model()
    ref = copy.deepcopy(model)
    cap = capture(model, (x,))
    nested = CheckpointPlanner(cap, loss_fn=_loss, time_model="roofline")
    one = CheckpointPlanner(cap, loss_fn=_loss, time_model="roofline", nested=False)
    assert not any(p.nested for p in one.frontier)
    # 12 blocks: one level keeps 12 block inputs and one block's activations at its floor;
    # two levels keep a few span inputs, one span's block inputs and one block's activations
    assert nested.floor_bytes() < 0.9 * one.floor_bytes()
    plan = nested.plan(nested.min_budget_bytes())
    assert plan.nested and plan.peak_bytes == nested.floor_bytes()
    with_nested = OptimizedModule(model, cap, plan.gm)
    measured = memfit.measure(with_nested, example_inputs=(x,), loss_fn=_loss).peak_bytes
    assert abs(measured - plan.peak_bytes) <= 1e-3 * measured
    # dropout masks replayed through both levels
    torch.manual_seed(5)
    g = torch.autograd.grad(_loss(with_nested(x)), list(model.parameters()))
    torch.manual_seed(5)
    g_ref = torch.autograd.grad(_loss(ref(x)), list(ref.parameters()))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    [d] = [d for d in plan.decisions if "nested" in d.detail]
    i, j = plan.nested[0]
    assert d.extra_time_s == 2 * sum(u.time_s for u in nested.units[i:j])
    # in the chain model, the frontier with nested spans is never slower at any budget
    from memfit.planning.solvers.frontier import pick
    for b in range(one.frontier[-1].peak_bytes, one.frontier[0].peak_bytes, 50_000):
        assert pick(nested.frontier, b).extra_time_s <= pick(one.frontier, b).extra_time_s * (1 + 1e-9)


def test_checkpoint_pass_applies_nested_regions(monkeypatch):
    from memfit.planning import checkpoint as planning

    monkeypatch.setattr(planning, "forward_profile", lambda cap, time_model: None)
    model, x = _model(p=0.0)
    cap = capture(model, (x,))
    budget = CheckpointPlanner(cap, loss_fn=_loss).min_budget_bytes()
    gm = copy.deepcopy(cap.gm)
    ctx = PassContext(captured=dataclasses.replace(cap, gm=gm), loss_fn=_loss)
    res = Checkpoint(budget=str(budget)).run(gm, ctx)
    assert res.stats["nested"] >= 1
    outer = [n.target for n in res.gm.graph.nodes if isinstance(n.target, CheckpointedRegion)]
    inner = [m.target for r in outer for m in r.gm.graph.nodes if isinstance(m.target, CheckpointedRegion)]
    assert len(inner) >= 2 * res.stats["nested"]
    assert not any(isinstance(m.target, CheckpointedRegion) for r in inner for m in r.gm.graph.nodes)
    # the module runs, and a deep copy recomputes with its own regions
    om = OptimizedModule(model, cap, res.gm)
    _loss(copy.deepcopy(om)(x)).backward()


def test_fsdp_plans_stay_one_level():
    model, x = _model(n=4, p=0.0)
    cap = capture(model, (x,))
    cap = dataclasses.replace(cap, fsdp_units=tuple(f"blocks.{k}" for k in range(4)))
    planner = CheckpointPlanner(cap, loss_fn=_loss, time_model="roofline")
    assert not any(p.nested for p in planner.frontier)
