"""Operator-level selective recompute: exactness, the bytes it keeps, the planner's choice."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import memfit
from memfit.cost_models.memory import analyze_step
from memfit.ir.capture import capture
from memfit.ir.module import OptimizedModule
from memfit.passes.checkpoint import Checkpoint, apply_spans, call_nodes, discover_runs, price_units
from memfit.passes.infra.base import PassContext
from memfit.planning.checkpoint import CheckpointPlanner
from memfit.planning.selective import selective_figures, why_not_selective
from memfit.runtime.checkpoint import CheckpointedRegion
from tests.test_checkpoint_models import _build


def _all_selective(cap, loss_fn):
    analyze_step(cap, loss_fn=loss_fn, symbolic=False)
    units = price_units(cap.gm, discover_runs(cap.gm, call_nodes(cap.gm)))
    sel = selective_figures(cap.gm, units)
    spans = tuple((k, k + 1) for k in range(len(units)) if sel.ok[k])
    return apply_spans(cap.gm, units, spans, selective=spans), spans


@pytest.mark.parametrize("name", ["gpt2_like", "resnet_like", "hf_gpt2"])
def test_selective_regions_are_exact(name):
    # dropout (gpt2_like, hf_gpt2) replays its masks; BatchNorm (resnet_like) updates its
    # statistics once; the symbolic_trace road (gpt2_like) and the export road (hf_gpt2)
    torch.manual_seed(0)
    model, inputs, loss_fn = _build(name)
    ref = copy.deepcopy(model)
    cap = capture(model, inputs, dynamic=False)
    (new, made), spans = _all_selective(cap, loss_fn)
    assert len(spans) >= 2 and all(n.target.selective for n in made)
    wrapped = OptimizedModule(model, cap, new)
    torch.manual_seed(3)
    l_ref = loss_fn(ref(*inputs))
    g_ref = torch.autograd.grad(l_ref, list(ref.parameters()))
    torch.manual_seed(3)
    l_new = loss_fn(wrapped(*inputs))
    g_new = torch.autograd.grad(l_new, list(model.parameters()))
    assert torch.allclose(l_new, l_ref, rtol=1e-6)
    num = sum((a.double() - b.double()).pow(2).sum() for a, b in zip(g_new, g_ref)).sqrt()
    den = sum(b.double().pow(2).sum() for b in g_ref).sqrt()
    assert float(num / den) < 1e-5
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k


def test_selective_keeps_matmul_outputs_as_predicted():
    # Whole regions < selective regions < no recompute, each predicted within 0.1% of its
    # measured step peak (the selective cache holds exactly the matmul outputs).
    from examples import gpt2_like

    torch.manual_seed(0)
    model, inputs = gpt2_like.make(batch_size=2, seq_len=64, layers=2, d=64, heads=2, vocab=128)
    cap = capture(model, inputs, dynamic=False)
    loss_fn = gpt2_like.loss_fn
    a0 = analyze_step(cap, loss_fn=loss_fn, symbolic=False)
    units = price_units(cap.gm, discover_runs(cap.gm, call_nodes(cap.gm)))
    sel = selective_figures(cap.gm, units)
    blocks = tuple((k, k + 1) for k, u in enumerate(units) if u.label.startswith("h.") and sel.ok[k])
    assert len(blocks) >= 2
    peaks = {}
    for mode, selective in (("whole", ()), ("selective", blocks)):
        gm, _ = apply_spans(cap.gm, units, blocks, selective=selective)
        pred = analyze_step(dataclasses.replace(cap, gm=gm), loss_fn=loss_fn, symbolic=False).peak_bytes
        meas = memfit.measure(OptimizedModule(model, cap, gm), example_inputs=inputs, loss_fn=loss_fn).peak_bytes
        assert abs(pred - meas) <= 1e-3 * meas, (mode, pred, meas)
        peaks[mode] = pred
    assert peaks["whole"] < peaks["selective"] < a0.peak_bytes
    # what the selective blocks keep: the kept bytes of their matmuls (at least)
    assert peaks["selective"] - peaks["whole"] >= 0.5 * sum(sel.kept[i] for i, _ in blocks)


def test_planner_frontier_with_selective_regions_is_no_slower_and_used():
    from examples import gpt2_like
    from memfit.planning.solvers.frontier import pick

    torch.manual_seed(0)
    model, inputs = gpt2_like.make(batch_size=2, seq_len=64, layers=2, d=64, heads=2, vocab=128)
    cap = capture(model, inputs, dynamic=False)
    both = CheckpointPlanner(cap, loss_fn=gpt2_like.loss_fn, time_model="roofline")
    whole = CheckpointPlanner(cap, loss_fn=gpt2_like.loss_fn, time_model="roofline", selective=False)
    assert any(p.selective for p in both.frontier)
    assert not any(p.selective for p in whole.frontier)
    # in the chain model, at every budget the frontier with selective spans has a plan at
    # least as fast as the one without (it contains the whole-span plans)
    top = whole.frontier[0].peak_bytes
    for b in range(whole.frontier[-1].peak_bytes, top + 1, max(1, (top - whole.frontier[-1].peak_bytes) // 40)):
        assert pick(both.frontier, b).extra_time_s <= pick(whole.frontier, b).extra_time_s * (1 + 1e-9)
    used, last = 0, None
    for pct in (95, 90, 85, 80, 75, 70, 65):
        if both.budget_bytes(f"{pct}%") < both.min_budget_bytes():
            continue
        pb = both.plan(f"{pct}%")
        assert pb.peak_bytes <= pb.budget_bytes
        used += bool(pb.selective)
        if last is not None:
            assert pb.peak_bytes <= last            # monotone in the budget
        last = pb.peak_bytes
    assert used
    # selective spans never raise the floor (the floor of recompute is whole spans)
    assert both.floor_bytes() <= whole.floor_bytes()


def test_checkpoint_pass_counts_selective_regions(monkeypatch):
    from examples import gpt2_like
    from memfit.planning import checkpoint as planning

    # recompute priced by the roofline for the pass and the planner alike (no timing noise)
    monkeypatch.setattr(planning, "forward_profile", lambda cap, time_model: None)
    torch.manual_seed(0)
    model, inputs = gpt2_like.make(batch_size=2, seq_len=32, layers=2, d=32, heads=2, vocab=64)
    cap = capture(model, inputs, dynamic=False)
    planner = CheckpointPlanner(cap, loss_fn=gpt2_like.loss_fn)
    i = next(k for k, p in enumerate(planner.frontier) if p.selective)
    budget = planner.figure(i) / (1 - planner.margin) + 1
    p = planner.plan(int(budget))
    ctx = PassContext(captured=cap, loss_fn=gpt2_like.loss_fn)
    gm = copy.deepcopy(cap.gm)
    res = Checkpoint(budget=str(int(budget))).run(gm, dataclasses.replace(ctx, captured=dataclasses.replace(cap, gm=gm)))
    calls = [n.target for n in res.gm.graph.nodes if isinstance(n.target, CheckpointedRegion)]
    assert res.stats["regions"] == len(calls) >= 1
    assert res.stats["selective"] == sum(c.selective for c in calls) == len(p.selective) >= 1
    assert any("selective" in d.detail for d in res.decisions)
    off = Checkpoint(budget=str(int(budget)), selective=False)
    gm2 = copy.deepcopy(cap.gm)
    res2 = off.run(gm2, dataclasses.replace(ctx, captured=dataclasses.replace(cap, gm=gm2)))
    assert res2.stats["selective"] == 0


class _InPlaceOnMatmul(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x):
        h = self.a(x)
        h.mul_(2.0)               # selective recompute would hand back the kept, unscaled value
        return self.b(torch.tanh(h))


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        return g * 3


class _WithFunction(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.a = nn.Linear(d, d)

    def forward(self, x):
        return _Scale.apply(torch.relu(self.a(x)))


class _Net(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.blocks = nn.ModuleList([block(), block()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x.sum(-1)


@pytest.mark.parametrize("block, node, why", [(_InPlaceOnMatmul, "blocks_0_a", "in place"),
                                              (_WithFunction, "apply__scale", "does not replay")])
def test_units_selective_recompute_cannot_replay_are_left_whole(block, node, why):
    torch.manual_seed(0)
    model = _Net(block)
    x = torch.randn(8, 16)
    cap = capture(model, (x,))
    analyze_step(cap, loss_fn=lambda o: o.square().mean(), symbolic=False)
    nodes = call_nodes(cap.gm)
    units = price_units(cap.gm, discover_runs(cap.gm, nodes))
    sel = selective_figures(cap.gm, units)
    names = [n.name for n in nodes]
    k = next(k for k, u in enumerate(units) if any(m.startswith(node) for m in names[u.start:u.end]))
    assert not sel.ok[k]
    assert why in why_not_selective(cap.gm, nodes[units[k].start:units[k].end])
    # what may be selective is, and the whole model stays exact with it
    chosen = tuple((i, i + 1) for i in range(len(units)) if sel.ok[i])
    assert chosen
    gm, _ = apply_spans(cap.gm, units, chosen, selective=chosen)
    ref = copy.deepcopy(model)
    g = torch.autograd.grad(OptimizedModule(model, cap, gm)(x).square().mean(), list(model.parameters()))
    g_ref = torch.autograd.grad(ref(x).square().mean(), list(ref.parameters()))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_hf_bert_selective_plan_predicted_and_exact():
    # a transformers encoder (export road, sdpa attention) under a budget that the planner
    # meets with selective regions: predicted peak within 0.1% of measured, gradients exact
    pytest.importorskip("transformers")
    from examples import hf_models

    torch.manual_seed(0)
    model, inputs = hf_models.bert(batch_size=2, seq_len=32, layers=3, d=64, heads=2)
    ref = copy.deepcopy(model)
    loss_fn = hf_models.loss_fn
    cap = capture(model, inputs, dynamic=False)
    planner = CheckpointPlanner(cap, loss_fn=loss_fn, time_model="roofline")
    picks = [k for k, p in enumerate(planner.frontier) if p.selective]
    assert picks
    budget = int(planner.figure(picks[0]) / (1 - planner.margin)) + 1
    plan = planner.plan(budget)
    assert plan.selective
    wrapped = OptimizedModule(model, cap, plan.gm)
    meas = memfit.measure(wrapped, example_inputs=inputs, loss_fn=loss_fn).peak_bytes
    assert abs(plan.peak_bytes - meas) <= 1e-3 * meas and meas <= budget
    torch.manual_seed(1)
    g_ref = torch.autograd.grad(loss_fn(ref(*inputs)), list(ref.parameters()))
    torch.manual_seed(1)
    g_new = torch.autograd.grad(loss_fn(wrapped(*inputs)), list(model.parameters()))
    for a, b in zip(g_new, g_ref):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
