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
