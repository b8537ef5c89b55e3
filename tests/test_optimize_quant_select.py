"""memfit.optimize quantizes only the shortest ranked prefix of saved tensors that meets the
budget (memfit/planning/quantize.py): fewer tensors than all, budget met when predicted and
measured, minimal prefix, gradients close to the unmodified model's."""

import dataclasses
import re

import pytest
import torch

import examples.gpt2_like as gpt
import memfit
from memfit.ir.capture import capture
from memfit.cost_models.memory import analyze_step
from memfit.passes import PassContext, PassManager
from memfit.ir.fx_utils import copy_graph_module
from memfit.passes.checkpoint import CheckpointPlanner, apply_spans
from memfit.passes.quantize import QuantizeActivations, price_candidates
from memfit.planning.quantize import rank_nodes, select_quantized, shortest_prefix

KW = dict(batch_size=4, seq_len=64, layers=2, d=64, heads=4, vocab=128, dropout=0.0)
OPT = "sgd"


def _model():
    torch.manual_seed(0)
    return gpt.make(**KW)


def _quantized_peak(cap, g, nodes=()):
    """Predicted peak of graph `g` (rewritten in place) with `nodes` quantized (() = all)."""
    ctx = PassContext(captured=dataclasses.replace(cap, gm=g), optimizer=OPT, loss_fn=gpt.loss_fn)
    res = PassManager([QuantizeActivations(nodes=tuple(nodes))]).run(g, ctx)
    return analyze_step(dataclasses.replace(cap, gm=res.gm), optimizer=OPT, loss_fn=gpt.loss_fn,
                        symbolic=False).peak_bytes, res


@pytest.fixture(scope="module")
def setup():
    model, inputs = _model()
    cap = capture(model, inputs, None, dynamic=False)
    base = analyze_step(cap, optimizer=OPT, loss_fn=gpt.loss_fn, symbolic=False).peak_bytes
    q_all, res = _quantized_peak(cap, copy_graph_module(cap.gm))
    assert q_all < base
    eligible = res.stats["quantize-activations.tensors"]
    return model, inputs, cap, base, q_all, eligible, (base + q_all) // 2


def _grads(model, inputs):
    model.zero_grad(set_to_none=True)
    gpt.loss_fn(model(*inputs)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_optimize_quantizes_fewer_tensors_and_meets_the_budget(setup):
    model, inputs, _, base, q_all, eligible, budget = setup
    om = memfit.optimize(model, budget, example_inputs=inputs, optimizer=OPT, loss_fn=gpt.loss_fn,
                         techniques=["quantize"])
    plan = om.memfit_plan
    [d] = [d for d in plan.decisions if d.action.startswith("quantize-activations")]
    wrapped = [m.node_name for m in om.graph_module.memfit_quant.children()]
    assert 0 < len(wrapped) < eligible
    assert d.detail.startswith("8-bit on ") and f"of {eligible} eligible saved tensors" in d.detail
    assert plan.peak_bytes <= budget < base
    measured = memfit.measure(om, example_inputs=inputs, optimizer=OPT, loss_fn=gpt.loss_fn)
    assert measured.peak_bytes <= budget, (measured.peak_bytes, budget)
    # predicted extra time: the chosen candidates' times, below what quantizing all would cost
    cap = setup[2]  # captured like optimize's (same node names; no structural pass allowed here)
    cands = price_candidates(cap.gm, PassContext(captured=cap), QuantizeActivations().config())
    order = rank_nodes(cands)
    k = int(re.search(r"\((\d+) of \d+ nodes: ", d.detail).group(1))
    listed = ", ".join(order[:min(k, 5)]) + (f" and {k - 5} more" if k > 5 else "")
    assert d.detail.split(": ", 1)[1].startswith(listed)
    assert set(order[:k]) <= set(wrapped)  # plus nodes saving the same storage (the pass's closure)
    t_all = sum(c.time_cost_s for c in cands)
    t_sel = sum(c.time_cost_s for c in cands if c.node in set(wrapped))
    assert d.extra_time_s == pytest.approx(t_sel, rel=1e-3, abs=2e-6)
    assert d.extra_time_s < t_all
    # (c) gradients stay close to the unmodified model's, per parameter
    g_ref = _grads(model, inputs)
    g_opt = _grads(om, inputs)
    assert g_opt.keys() == g_ref.keys()
    for k in g_ref:
        cos = torch.nn.functional.cosine_similarity(g_opt[k].flatten(), g_ref[k].flatten(), dim=0)
        assert cos >= 0.99, (k, float(cos))


def test_chosen_prefix_is_minimal(setup):
    _, _, cap, base, q_all, eligible, budget = setup

    def pass_ctx(g):
        return PassContext(captured=dataclasses.replace(cap, gm=g), optimizer=OPT, loss_fn=gpt.loss_fn)

    ch = select_quantized(QuantizeActivations(), lambda: copy_graph_module(cap.gm), budget, base, cap, pass_ctx,
                          OPT, gpt.loss_fn)
    assert ch.fits and ch.minimal and ch.simulations <= 6
    assert ch.peak <= budget and 1 <= len(ch.nodes) < ch.eligible_nodes
    order = rank_nodes(price_candidates(cap.gm, pass_ctx(cap.gm), QuantizeActivations().config()))
    assert list(ch.nodes) == order[:len(ch.nodes)]
    # re-running the pass: the chosen set fits, one fewer does not
    assert _quantized_peak(cap, copy_graph_module(cap.gm), ch.nodes)[0] <= budget
    if len(ch.nodes) > 1:
        assert _quantized_peak(cap, copy_graph_module(cap.gm), ch.nodes[:-1])[0] > budget


def test_all_quantized_over_budget_reports_no_fit(setup):
    _, _, cap, base, q_all, _, _ = setup

    def pass_ctx(g):
        return PassContext(captured=dataclasses.replace(cap, gm=g), optimizer=OPT, loss_fn=gpt.loss_fn)

    ch = select_quantized(QuantizeActivations(), lambda: copy_graph_module(cap.gm), q_all - 1, base, cap,
                          pass_ctx, OPT, gpt.loss_fn)
    assert not ch.fits and ch.peak == q_all and ch.simulations == 1 and ch.gm is None


def test_selection_on_a_checkpointed_graph_gets_a_fresh_graph_per_trial():
    torch.manual_seed(0)
    model, inputs = gpt.make(batch_size=2, seq_len=32, layers=2, d=32, heads=2, vocab=64, dropout=0.0)
    cap = capture(model, inputs, None, dynamic=False)
    planner = CheckpointPlanner(cap, optimizer=OPT, loss_fn=gpt.loss_fn)
    spans = next(p.spans for p in planner.frontier if p.spans)
    ck_peak, ckgm = planner.simulate(spans)
    made = []

    def fresh():
        g = apply_spans(cap.gm, planner.units, spans)[0]
        made.append(g)
        return g

    def pass_ctx(g):
        return PassContext(captured=dataclasses.replace(cap, gm=g), optimizer=OPT, loss_fn=gpt.loss_fn)

    q_all, _ = _quantized_peak(cap, apply_spans(cap.gm, planner.units, spans)[0])
    assert q_all < ck_peak
    budget = (q_all + ck_peak) // 2
    ch = select_quantized(QuantizeActivations(), fresh, budget, ck_peak, cap, pass_ctx, OPT, gpt.loss_fn)
    assert ch.fits and ch.peak <= budget and len(ch.nodes) < ch.eligible_nodes
    assert len({id(g) for g in made}) == ch.simulations  # never a graph rewritten twice
    assert any(n.name.startswith("memfit_ckpt_") for n in ch.gm.graph.nodes)
    # the chosen graph runs and its gradients stay close to the unmodified model's
    from memfit.ir.module import OptimizedModule
    om = OptimizedModule(model, dataclasses.replace(cap, gm=ch.gm), ch.gm)
    g_ref = _grads(model, inputs)
    g_opt = _grads(om, inputs)
    for k in g_ref:
        cos = torch.nn.functional.cosine_similarity(g_opt[k].flatten(), g_ref[k].flatten(), dim=0)
        assert cos >= 0.99, (k, float(cos))


def test_optimize_recompute_plus_selected_quantization(setup, monkeypatch):
    # On these examples recompute alone reaches lower than recompute + 8-bit (RESULTS.md), so
    # the combined path is reached by making recompute alone fail; the budget is below the
    # all-8-bit peak without recompute, so a frontier plan must carry it.
    from memfit.errors import BudgetError

    def no_plan(self, budget):
        raise BudgetError("recompute alone disabled by the test")

    monkeypatch.setattr(CheckpointPlanner, "plan", no_plan)
    # recompute priced by the roofline: with measured times the frontier moves with the
    # machine's noise, and one of the plans the combined path tries first may fit by
    # recompute alone, which skips quantization
    from memfit.planning import checkpoint as planning
    monkeypatch.setattr(planning, "forward_profile", lambda cap, time_model: None)
    model, inputs, _, base, q_all, _, _ = setup
    budget = q_all - 1
    om = memfit.optimize(model, budget, example_inputs=inputs, optimizer=OPT, loss_fn=gpt.loss_fn,
                         techniques=["checkpoint", "quantize"])
    plan = om.memfit_plan
    assert any(d.action == "recompute" for d in plan.decisions)
    [d] = [d for d in plan.decisions if d.action.startswith("quantize-activations")]
    assert d.target == "(outside recomputed regions)"
    m = re.match(r"8-bit on (\d+) of (\d+) eligible", d.detail)
    assert m and 0 < int(m.group(1)) < int(m.group(2)), d.detail
    assert plan.peak_bytes <= budget
    assert memfit.measure(om, example_inputs=inputs, optimizer=OPT, loss_fn=gpt.loss_fn).peak_bytes <= budget
    g_ref, g_opt = _grads(model, inputs), _grads(om, inputs)
    for k in g_ref:
        cos = torch.nn.functional.cosine_similarity(g_opt[k].flatten(), g_ref[k].flatten(), dim=0)
        assert cos >= 0.99, (k, float(cos))


# ----------------------------------------------------------------------------- the search alone

def _search(peaks, budget, max_sims=5):
    calls = []

    def peak_at(k):
        calls.append(k)
        return peaks[k]

    cum = list(range(0, 10 * len(peaks), 10))  # equal bytes per step
    k, minimal, n = shortest_prefix(cum, budget, peak_at, peaks[0], peaks[-1], max_sims=max_sims)
    return k, minimal, n, calls


@pytest.mark.parametrize("budget", [95, 90, 61, 50, 31, 10])
def test_shortest_prefix_on_a_linear_curve(budget):
    peaks = [100 - 10 * k for k in range(11)]  # prefix k: 100 - 10k
    k, minimal, n, calls = _search(peaks, budget)
    assert k == min(i for i in range(1, 11) if peaks[i] <= budget)
    assert minimal and n <= 3 and len(calls) == n


def test_shortest_prefix_on_a_bent_curve_converges_within_the_cap():
    # the peak barely moves for the first seven (it sits where they are already freed)
    peaks = [100, 100, 99, 99, 98, 98, 97, 60, 50, 40, 30, 20, 10]
    for budget in (99, 97, 60, 55, 45, 25, 10):
        k, minimal, n, _ = _search(peaks, budget, max_sims=5)
        assert peaks[k] <= budget
        assert minimal and k == min(i for i in range(1, len(peaks)) if peaks[i] <= budget), budget


def test_shortest_prefix_capped_search_says_so():
    peaks = [100] * 40 + [0]
    k, minimal, n, calls = _search(peaks, 50, max_sims=2)
    assert n == 2 and k == 40 and not minimal
    k, minimal, n, calls = _search(peaks, 50, max_sims=8)
    assert k == 40 and minimal


def test_rank_nodes_largest_first_then_by_bytes_per_second():
    from memfit.passes.quantize import QuantCandidate

    def c(node, saved, t):
        return QuantCandidate(node, 0, (1,), "float32", saved, 0, saved, t, False)

    cands = [c("small", 10, 1e-6), c("big_slow", 100, 2e-6), c("big_fast", 100, 1e-6), c("mid", 30, 1e-6),
             c("mid", 30, 1e-6)]
    assert rank_nodes(cands) == ["big_fast", "big_slow", "mid", "small"]


def test_stochastic_rounding_can_be_predicted_and_leaves_the_seed_generator_alone():
    # analyze_step used to fail here: drawing a seed on FakeTensors is data-dependent
    from tests.models import MLP

    torch.manual_seed(0)
    model, x = MLP(), torch.randn(64, 64)
    cap = capture(model, (x,), None, dynamic=False)
    res = PassManager([QuantizeActivations(bits=4, stochastic=True)]).run(cap.gm, PassContext(captured=cap))
    assert res.stats["quantize-activations.tensors"] > 0
    gen = res.gm.memfit_quant.state.generator
    before = gen.get_state().clone()
    a = analyze_step(dataclasses.replace(cap, gm=res.gm), symbolic=False)
    assert a.peak_bytes > 0
    assert torch.equal(gen.get_state(), before)
    out = res.gm(x)
    (out[0] if isinstance(out, (tuple, list)) else out).sum().backward()
    assert not torch.equal(gen.get_state(), before)  # real steps draw their seeds
