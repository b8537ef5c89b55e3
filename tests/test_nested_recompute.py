"""Nested (two-level) recompute: a span of units is one region whose units are regions of
their own; exact, predicted, and planned on request (`nested=True`)."""

import copy
import dataclasses

import torch

import memfit
from memfit.cost_models.memory import analyze_step
from memfit.ir.capture import capture
from memfit.ir.module import OptimizedModule
from memfit.passes.checkpoint import Checkpoint, apply_spans
from memfit.passes.infra.base import PassContext
from memfit.planning.checkpoint import CheckpointPlanner
from memfit.planning.solvers.frontier import pick
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


def test_nested_regions_exact_and_predicted():
    model, x = _model()
    ref = copy.deepcopy(model)
    cap = capture(model, (x,))
    planner = CheckpointPlanner(cap, loss_fn=_loss, time_model="roofline", nested=True)
    spans = ((0, 4), (4, 8), (8, 12))
    gm, made = apply_spans(cap.gm, planner.units, spans, nested=spans)
    assert len(made) == 3
    assert all(sum(isinstance(m.target, CheckpointedRegion) for m in r.target.gm.graph.nodes) == 4 for r in made)
    predicted = analyze_step(dataclasses.replace(cap, gm=gm), loss_fn=_loss, symbolic=False).peak_bytes
    assert predicted == planner.simulate(spans, (), spans)[0]
    nested = OptimizedModule(model, cap, gm)
    measured = memfit.measure(nested, example_inputs=(x,), loss_fn=_loss).peak_bytes
    assert abs(measured - predicted) <= 1e-3 * measured
    # dropout masks replayed through both levels
    torch.manual_seed(5)
    g = torch.autograd.grad(_loss(nested(x)), list(model.parameters()))
    torch.manual_seed(5)
    g_ref = torch.autograd.grad(_loss(ref(x)), list(ref.parameters()))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # the decision prices a nested span at twice its units' forward time
    [d] = planner.decisions_for(((0, 4),), (), ((0, 4),))
    assert "nested" in d.detail and d.extra_time_s == 2 * sum(u.time_s for u in planner.units[0:4])


def test_planner_with_nested_spans_is_no_slower_and_its_floor_no_higher():
    model, x = _model(n=8, p=0.0)
    cap = capture(model, (x,))
    nested = CheckpointPlanner(cap, loss_fn=_loss, time_model="roofline", nested=True)
    one = CheckpointPlanner(cap, loss_fn=_loss, time_model="roofline")
    assert any(p.nested for p in nested.frontier) and not any(p.nested for p in one.frontier)
    for b in range(one.frontier[-1].peak_bytes, one.frontier[0].peak_bytes, 50_000):
        assert pick(nested.frontier, b).extra_time_s <= pick(one.frontier, b).extra_time_s * (1 + 1e-9)
    assert nested.floor_bytes() <= one.floor_bytes()


def test_floor_is_at_most_per_block_checkpointing():
    # the per-block plan is a floor candidate: the chain model ranks it behind plans whose
    # simulated steps are higher (planning/units.block_spans)
    model, x = _model(p=0.0)
    cap = capture(model, (x,))
    planner = CheckpointPlanner(cap, loss_fn=_loss, time_model="roofline")
    per_block = tuple((k, k + 1) for k in range(12))
    assert planner.floor_bytes() <= planner.simulate(per_block)[0]


def test_checkpoint_pass_nested_option(monkeypatch):
    from memfit.planning import checkpoint as planning

    monkeypatch.setattr(planning, "forward_profile", lambda cap, time_model: None)
    model, x = _model(n=6, p=0.0)
    cap = capture(model, (x,))
    planner = CheckpointPlanner(cap, loss_fn=_loss, nested=True)
    k = next(k for k, p in enumerate(planner.frontier) if p.nested)
    budget = int(planner.figure(k) / (1 - planner.margin)) + 1
    expected = planner.plan(budget)
    gm = copy.deepcopy(cap.gm)
    res = Checkpoint(budget=str(budget), nested=True).run(gm, PassContext(captured=dataclasses.replace(cap, gm=gm),
                                                                          loss_fn=_loss))
    assert res.stats["nested"] == len(expected.nested)
    outer = [n.target for n in res.gm.graph.nodes if isinstance(n.target, CheckpointedRegion)]
    inner = [m.target for r in outer for m in r.gm.graph.nodes if isinstance(m.target, CheckpointedRegion)]
    assert len(inner) >= 2 * res.stats["nested"]
    om = OptimizedModule(model, cap, res.gm)
    _loss(copy.deepcopy(om)(x)).backward()     # a deep copy recomputes with its own regions


def test_fsdp_plans_stay_one_level():
    model, x = _model(n=4, p=0.0)
    cap = dataclasses.replace(capture(model, (x,)), fsdp_units=tuple(f"blocks.{k}" for k in range(4)))
    assert not any(p.nested for p in CheckpointPlanner(cap, loss_fn=_loss, time_model="roofline",
                                                       nested=True).frontier)
