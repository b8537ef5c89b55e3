"""The optimizer step fused into backward (memfit/runtime/optim.py StepInBackward, technique
"step_in_backward"): the same update as the unfused step, bit for bit, with LR schedules and
parameter groups; the peak it saves, predicted and measured; what it refuses."""

import copy

import pytest
import torch
from torch import nn

import memfit
from memfit.runtime.optim import StepInBackward, why_not
from tests.models import ce, decay_groups as groups, gelu_mlp


def mlp():
    return gelu_mlp(64, 256, 10)


X, Y = torch.randn(16, 64), torch.randint(0, 10, (16,))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95)),
], ids=["sgd-nesterov", "adam", "adamw"])
def test_same_update_bit_for_bit_with_groups_and_schedule(make):
    ref, model = mlp(), mlp()
    ropt = make(groups(ref))
    om, opt = memfit.optimize(model, "99%", example_inputs=(X,), example_targets=(Y,), loss_fn=ce,
                              optimizer=make(groups(model)), techniques=["step_in_backward"])
    assert isinstance(opt, StepInBackward)
    assert [d.action for d in om.memfit_plan.decisions] == ["step-in-backward"]
    memfit.measure(om, example_inputs=(X,), example_targets=(Y,), loss_fn=ce, optimizer=opt)   # restores all
    rs = torch.optim.lr_scheduler.StepLR(ropt, 1, gamma=0.5)
    s = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for _ in range(3):
        ropt.zero_grad()
        ce(ref(X), Y).backward()
        ropt.step()
        rs.step()
        opt.zero_grad()
        ce(om(X), Y).backward()
        assert all(p.grad is None for p in model.parameters())       # freed inside backward
        opt.step()
        s.step()
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    # the usual state_dict format, loadable into the unfused optimizer
    plain = make(groups(copy.deepcopy(model)))
    plain.load_state_dict(opt.state_dict())
    assert plain.state_dict()["state"].keys() == ropt.state_dict()["state"].keys()


def test_peak_predicted_and_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10))
    x = torch.randn(32, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    base = memfit.measure(model, example_inputs=(x,), example_targets=(Y[:1].repeat(32),), loss_fn=ce, optimizer=opt)
    om, fused = memfit.optimize(model, "98%", example_inputs=(x,), example_targets=(Y[:1].repeat(32),), loss_fn=ce,
                                optimizer=opt, techniques=["step_in_backward"])
    [d] = om.memfit_plan.decisions
    assert d.target == "(gradients)" and d.action == "step-in-backward" and d.saved_bytes > 0
    m = memfit.measure(om, example_inputs=(x,), example_targets=(Y[:1].repeat(32),), loss_fn=ce, optimizer=fused)
    assert m.peak_bytes <= om.memfit_plan.budget_bytes < base.peak_bytes
    assert abs(m.peak_bytes - om.memfit_plan.peak_bytes) <= 64          # allocator rounding
    assert om.memfit_plan.optimizer == "AdamW (step in backward)"


def test_accumulation_is_refused_and_the_plain_model_unaffected():
    model = mlp()
    om, opt = memfit.optimize(model, "99%", example_inputs=(X,), example_targets=(Y,), loss_fn=ce,
                              optimizer=torch.optim.SGD(model.parameters(), lr=0.1), techniques=["step_in_backward"])
    ce(om(X), Y).backward()
    with pytest.raises(RuntimeError, match="second backward before optimizer.step"):
        ce(om(X), Y).backward()
    opt.step()
    ce(model(X), Y).backward()                  # through the user's own model: plain accumulation
    assert all(p.grad is not None for p in model.parameters())


def test_not_applicable_says_why():
    model = mlp()
    assert "not known to update each parameter" in why_not(torch.optim.LBFGS(model.parameters()))
    assert why_not("adamw") is not None
    with pytest.raises(memfit.BudgetError):     # with a name there is no optimizer to hand back fused
        memfit.optimize(model, "90%", example_inputs=(X,), example_targets=(Y,), loss_fn=ce, optimizer="adamw",
                        techniques=["step_in_backward", "checkpoint"])


def test_the_ladder_tries_the_step_in_backward_again_with_the_other_techniques(monkeypatch):
    """Where stepping in backward does not lower the peak at first (it is at the start of
    backward, ViT-B's case), the ladder is tried again with it: recompute and smaller states
    move the peak to where the gradients are, which it frees. Here the first look is made to
    decline, and the second pass finds the plans the first cannot."""
    from memfit.planning import strategy

    monkeypatch.setattr(strategy, "fused_step", lambda cap, gm, peak, ctx: (peak, []))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10))
    x = torch.randn(32, 256)

    def loss(o):
        return ce(o, Y[:1].repeat(32))

    with pytest.raises(memfit.BudgetError):
        memfit.optimize(model, "97%", example_inputs=(x,), loss_fn=loss, optimizer=torch.optim.AdamW(model.parameters()),
                        techniques=["checkpoint"], time_model="roofline")
    om, opt = memfit.optimize(model, "97%", example_inputs=(x,), loss_fn=loss,
                              optimizer=torch.optim.AdamW(model.parameters()),
                              techniques=["checkpoint", "step_in_backward"], time_model="roofline")
    assert isinstance(opt, StepInBackward)
    first = om.memfit_plan.decisions[0]
    assert first.action == "step-in-backward" and "taken with the techniques below" in first.detail
    m = memfit.measure(om, example_inputs=(x,), loss_fn=loss, optimizer=opt)
    assert m.peak_bytes <= om.memfit_plan.budget_bytes
