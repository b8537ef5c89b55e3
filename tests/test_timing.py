"""The measured time model (memfit.cost_models.timing): what the profile leaves behind, how
the cost model uses it, and how the planner says which model priced recompute. Its accuracy
is a benchmark (tools/bench/time_model.py), not a timed unit test."""

import dataclasses

import pytest
import torch

import memfit
from memfit.cost_models.memory import analyze_step
from memfit.cost_models.timing import profile_forward, step_time_s
from memfit.ir.capture import capture
from memfit.planning.checkpoint import forward_profile
from tests.models import Block, ConvBN


def test_profile_leaves_buffers_and_rng_as_they_were():
    torch.manual_seed(0)
    model = torch.nn.Sequential(ConvBN(), torch.nn.Dropout(0.5))
    x = torch.randn(4, 3, 16, 16)
    cap = capture(model, (x,), dynamic=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    prof = profile_forward(cap, repeats=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # BN statistics, counts
    assert torch.equal(torch.get_rng_state(), rng)                                   # dropout's draws undone
    calls = {n.name for n in cap.gm.graph.nodes if n.op in ("call_function", "call_module", "call_method")}
    assert set(prof.node_s) == calls and prof.forward_s == pytest.approx(sum(prof.node_s.values()))
    assert prof.runs == 2 and prof.overhead_s >= 0 and "measured" in prof.note()


def test_analysis_takes_measured_times_and_scales_the_rest():
    cap = capture(Block(32, 4), (torch.randn(2, 8, 32),), dynamic=False)
    analyze_step(cap, symbolic=False)
    roof = {n.name: n.meta["memfit"].est_time_s for n in cap.gm.graph.nodes if "memfit" in n.meta}
    named = sorted(k for k, v in roof.items() if v > 0)
    given = {k: 1e-3 for k in named[: len(named) // 2]}         # half the nodes "measured"
    analyze_step(cap, symbolic=False, node_times=given)
    got = {n.name: n.meta["memfit"].est_time_s for n in cap.gm.graph.nodes if "memfit" in n.meta}
    scale = sum(given.values()) / sum(roof[k] for k in given)
    for k in roof:
        assert got[k] == pytest.approx(given[k] if k in given else roof[k] * scale)


def test_time_model_choice_and_where_it_cannot_measure():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 8, 32)
    cap = capture(Block(32, 4), (x,), dynamic=False)
    assert forward_profile(cap, "roofline") is None
    assert forward_profile(cap, "measured").forward_s > 0
    with FakeTensorMode(allow_non_fake_inputs=True) as fm:
        fake = fm.from_tensor(x)
    # the torch.compile backend's graphs hold fakes: priced by the roofline
    assert forward_profile(dataclasses.replace(cap, example_inputs=(fake,)), "measured") is None
    with pytest.raises(ValueError, match="time_model='guess'"):
        memfit.optimize(Block(32, 4), "50%", example_inputs=(x,), time_model="guess")
    assert step_time_s(0.01, 0, 1.0) == pytest.approx(0.03)     # forward + twice as long a backward


@pytest.mark.parametrize("time_model,says", [("measured", "measured forward times"),
                                             ("roofline", "roofline on nominal rates")])
def test_plan_says_how_recompute_was_priced(time_model, says):
    from tests.models import BlockStack

    model, x = BlockStack(4, 32), torch.randn(4, 64, 32)
    om = memfit.optimize(model, "60%", example_inputs=(x,), techniques="checkpoint", time_model=time_model)
    recompute = [d for d in om.memfit_plan.decisions if d.action == "recompute"]
    assert recompute and says in recompute[-1].detail
    assert all(d.extra_time_s > 0 for d in recompute)


def test_the_profile_is_measured_once_per_graph_and_machine():
    """Plans repeat from run to run: the second planner of the same graph reads the first one's
    profile back (a fresh one's noise would move the frontier and a refusal's least budget)."""
    from memfit.cost_models.probe_store import clear_memo
    from memfit.cost_models.timing import cached_profile

    cap = capture(Block(24, 4), (torch.randn(3, 8, 24),), dynamic=False)
    first = cached_profile(cap)
    clear_memo()                                   # as a new process would: from the file
    again = cached_profile(cap)
    assert again.node_s == first.node_s and again.wall_s == 0.0 and "probe cache" in again.note()
    other = cached_profile(capture(Block(24, 4), (torch.randn(5, 8, 24),), dynamic=False))
    assert other.wall_s > 0                        # other shapes: measured anew


def test_profile_times_the_backward_of_nodes_gradients_reach():
    """Per node, the backward is timed where a gradient flows: from the parameters and from
    inputs that require grad; not for a branch on a constant input, nor for in-place updates."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x, c):
            k = c * 2.0 + 1.0                  # reached by no gradient
            return torch.relu(self.fc(x)) * k

    x, c = torch.randn(8, 16), torch.randn(8, 16)
    cap = capture(Net(), (x, c), dynamic=False)
    prof = profile_forward(cap, repeats=2)
    assert prof.backward_node_s is not None and prof.backward_s > 0
    nodes = {n.name: n for n in cap.gm.graph.nodes}
    timed = set(prof.backward_node_s)
    linear = [k for k in timed if "linear" in k or "addmm" in k or k.startswith("fc")]
    assert linear, timed
    for k in timed:   # every timed node lies downstream of a parameter
        assert not set(nodes[k].all_input_nodes) <= {nodes[n] for n in nodes if nodes[n].op == "placeholder"
                                                      and "c" in n}
    constant = [n.name for n in cap.gm.graph.nodes
                if n.op == "call_function" and all(a.op == "placeholder" and a.name != "x" and "x" not in a.name
                                                   for a in n.all_input_nodes) and n.all_input_nodes]
    assert constant and not set(constant) & timed
    assert prof.step_s() == pytest.approx(prof.forward_s + prof.backward_s)
    assert "backward" in prof.note()
    assert dataclasses.replace(prof, backward_node_s=None).step_s() == pytest.approx(prof.forward_s * 3)


def test_region_overhead_is_probed_once_and_priced_per_region(monkeypatch):
    """The planner adds what each recomputed region costs beyond its operators, from a probe
    measured once per machine (memfit.cost_models.overheads)."""
    from memfit.cost_models import overheads
    from memfit.cost_models.overheads import RegionOverhead, region_overhead
    from memfit.cost_models.probe_store import clear_memo
    from memfit.planning.checkpoint import CheckpointPlanner
    from memfit.runtime.checkpoint import node_may_draw_random
    from tests.models import BlockStack

    ov = region_overhead(torch.device("cpu"))
    assert ov.fixed_s > 0 and ov.per_op_s > 0 and ov.backward_op_s > 0 and "per operator" in ov.note()

    def refuse(device):
        raise AssertionError("probed again")

    monkeypatch.setattr(overheads, "_probe_regions", refuse)
    clear_memo()
    assert region_overhead(torch.device("cpu")) == ov          # read back from the cache file
    assert RegionOverhead(1.0, 0.5, 2.0, 0.25, 4.0).seconds(3) == pytest.approx(2.5)
    assert RegionOverhead(1.0, 0.5, 2.0, 0.25, 4.0).seconds(3, selective=True, random=True) == pytest.approx(6.75)

    model, x = BlockStack(4, 32), torch.randn(4, 64, 32)
    cap = capture(model, (x,), dynamic=False)
    pl = CheckpointPlanner(cap)
    assert pl.overhead == ov
    spans = pl.frontier[-1].spans
    dec = pl.decisions_for(spans)
    for (i, j), d in zip(spans, dec):
        ops = sum(u.end - u.start for u in pl.units[i:j])
        rand = any(node_may_draw_random(n) for n in pl.nodes[pl.units[i].start:pl.units[j - 1].end])
        assert d.extra_time_s == pytest.approx(sum(u.time_s for u in pl.units[i:j]) + ov.seconds(ops, random=rand))
    assert "per operator" in dec[-1].detail and "the step without recompute predicted" in dec[-1].detail
    assert CheckpointPlanner(cap, time_model="roofline").overhead is None


def test_a_costly_region_makes_the_planner_choose_fewer(monkeypatch):
    """With a region dearer than any recompute, the fastest plan at a budget two plans meet is
    the one with fewer regions; the floor does not move."""
    from memfit.cost_models.overheads import RegionOverhead
    from memfit.planning import checkpoint as ck
    from tests.models import BlockStack

    model, x = BlockStack(6, 32), torch.randn(4, 64, 32)
    cap = capture(model, (x,), dynamic=False)
    cheap = ck.CheckpointPlanner(cap)
    monkeypatch.setattr(ck, "region_overhead_of", lambda cap, prof: RegionOverhead(fixed_s=10.0, selective_fixed_s=10.0))
    dear = ck.CheckpointPlanner(cap)
    assert dear.floor_bytes() == cheap.floor_bytes()
    for p in dear.frontier:
        assert p.extra_time_s >= 10.0 * len(p.spans)
    # along the dear frontier, faster plans never hold more regions
    counts = [len(p.spans) for p in sorted(dear.frontier, key=lambda p: p.extra_time_s)]
    assert counts == sorted(counts)
