"""The user's training step as they write it: a loss over real labels (in a closure or as
example_targets), a real optimizer instance, a smaller last batch, a custom autograd.Function,
a deep copy after optimize_, bad budgets."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.errors import BudgetError, CaptureError, MemfitError
from tests.grad_utils import param_grads, rel_error


class Net(nn.Module):
    def __init__(self, d=32, classes=10, layers=3):
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(layers))
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


@pytest.fixture
def data():
    torch.manual_seed(0)
    return Net(), torch.randn(16, 32, 16), torch.randint(0, 10, (16, 32))


def ce(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


# --- the loss ------------------------------------------------------------------------------

def test_loss_closing_over_real_labels_plans_and_matches_measurement(data):
    model, x, y = data
    loss_fn = lambda out: ce(out, y)  # noqa: E731 - the usual way to write it
    p = memfit.plan(model, example_inputs=(x,), loss_fn=loss_fn, optimizer="adamw", symbolic=False)
    m = memfit.measure(model, example_inputs=(x,), loss_fn=loss_fn, optimizer="adamw")
    assert p.peak_bytes == m.peak_bytes
    assert p.categories["saved_activations"] == m.saved_activations
    assert memfit.plan(model, example_inputs=(x,), loss_fn=loss_fn, optimizer="adamw").peak_bytes == p.peak_bytes


def test_example_targets_scale_with_the_batch(data):
    model, x, y = data
    p = memfit.plan(model, example_inputs=(x,), example_targets=(y,), loss_fn=ce, optimizer="adamw")
    m = memfit.measure(model, example_inputs=(x,), example_targets=(y,), loss_fn=ce, optimizer="adamw")
    assert p.peak_bytes == m.peak_bytes and m.inputs == x.nbytes + y.nbytes
    assert "B" in p.peak_expr and p.symbols == {"B": 16}
    # the largest batch within a budget holds with the labels scaling too
    x8, y8 = x[:8].clone(), y[:8].clone()
    p8 = memfit.plan(model, example_inputs=(x8,), example_targets=(y8,), loss_fn=ce, optimizer="adamw", symbolic=False)
    assert p8.categories["inputs"] == x8.nbytes + y8.nbytes
    assert memfit.plan(model, p8.peak_bytes, example_inputs=(x,), example_targets=(y,), loss_fn=ce,
                       optimizer="adamw").max_batch == 8
    with pytest.raises(TypeError, match="loss_fn"):
        memfit.plan(model, example_inputs=(x,), example_targets=(y,))


def test_hf_model_given_labels_uses_its_own_loss():
    pytest.importorskip("transformers")
    from examples import hf_models

    torch.manual_seed(0)
    model, (ids,) = hf_models.gpt2(batch_size=2, seq_len=16, layers=1, d=32, heads=2)
    kw = {"labels": ids}
    p = memfit.plan(model, example_kwargs={"input_ids": ids, **kw}, optimizer="adamw", symbolic=False)
    m = memfit.measure(model, example_kwargs={"input_ids": ids, **kw}, optimizer="adamw")
    assert abs(p.peak_bytes - m.peak_bytes) <= 0.02 * m.peak_bytes
    loss = model(input_ids=ids, **kw).loss
    from memfit.cost_models.optimizers import default_loss
    assert default_loss(model(input_ids=ids, **kw)) is not None and loss.dim() == 0


# --- the optimizer -------------------------------------------------------------------------

def test_adamw_instance_mirrored_and_returned(data):
    model, x, y = data
    decay, no_decay = [], []
    for n, prm in model.named_parameters():
        (no_decay if n.endswith("bias") else decay).append(prm)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    om, opt2 = memfit.optimize(model, "70%", example_inputs=(x,), example_targets=(y,), loss_fn=ce, optimizer=opt)
    assert opt2 is opt and isinstance(om, memfit.OptimizedModule)
    m = memfit.measure(model, example_inputs=(x,), example_targets=(y,), loss_fn=ce, optimizer=opt)
    p = memfit.plan(model, example_inputs=(x,), example_targets=(y,), loss_fn=ce, optimizer=opt, symbolic=False)
    assert p.categories["optimizer_state"] == m.optimizer_state >= 2 * sum(q.nbytes for q in model.parameters())
    assert p.peak_bytes == m.peak_bytes
    # trains the model's parameters: one step through the optimized module moves them
    before = [q.detach().clone() for q in model.parameters()]
    opt.zero_grad()
    ce(om(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, q) for a, q in zip(before, model.parameters()))


def test_optimizer_state_and_subclass_mirrored(data):
    model, x, y = data

    class MyAdam(torch.optim.Adam):
        def __init__(self, params, lr=1e-3, extra=7):   # a constructor that takes fewer defaults
            super().__init__(params, lr=lr)
            self.extra = extra

    opt = MyAdam(model.parameters(), lr=1e-2)
    ce(model(x), y).backward()
    opt.step()                            # existing state: exp_avg, exp_avg_sq, step
    model.zero_grad(set_to_none=True)
    from memfit.cost_models.optimizers import make_optimizer
    params = list(model.parameters())
    mirror = make_optimizer(opt, [q.detach().clone().requires_grad_() for q in params], params)
    assert type(mirror) is MyAdam and mirror.param_groups[0]["lr"] == 1e-2
    assert len(mirror.state) == len(params)
    p = memfit.plan(model, example_inputs=(x,), example_targets=(y,), loss_fn=ce, optimizer=opt, symbolic=False)
    m = memfit.measure(model, example_inputs=(x,), example_targets=(y,), loss_fn=ce, optimizer=opt)
    assert p.categories["optimizer_state"] == m.optimizer_state


# --- a smaller last batch -------------------------------------------------------------------

def test_smaller_last_batch_is_planned_again_with_exact_gradients(data):
    model, x, y = data
    om = memfit.optimize(model, "60%", example_inputs=(x,), loss_fn=lambda out: ce(out, y))
    xs, ys = x[:5], y[:5]
    torch.manual_seed(1)
    g_ref = param_grads(model, ce(model(xs), ys))
    torch.manual_seed(1)
    g_opt = param_grads(om, ce(om(xs), ys))
    assert rel_error(g_opt, g_ref) <= 1e-6
    assert len(om._memfit_variants) == 1
    om(xs)                                            # cached: no second plan
    assert len(om._memfit_variants) == 1
    variant = next(iter(om._memfit_variants.values()))
    assert variant.memfit_plan.budget_bytes == om.memfit_plan.budget_bytes   # the same bytes
    with pytest.raises(BudgetError):                  # a larger batch that cannot fit says so
        om(torch.randn(256, 32, 16))


def test_reversible_module_refuses_other_inputs():
    from memfit.passes.reversible import make_reversible
    from tests.models import BlockStack

    torch.manual_seed(0)
    m = BlockStack(4, d=16)
    rev = make_reversible(m, (torch.randn(2, 5, 16),), dynamic=False)
    with pytest.raises(MemfitError, match=r"input 0 has shape \[3, 5, 16\]"):
        rev(torch.randn(3, 5, 16))
    m.eval()
    with pytest.raises(MemfitError, match="changes the function"):
        rev(torch.randn(2, 5, 16))


# --- custom autograd.Function ---------------------------------------------------------------

class Ste(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.round()

    @staticmethod
    def backward(ctx, g):
        return g


class Scaled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        ctx.save_for_backward(t)
        return t * 2

    @staticmethod
    def backward(ctx, g):
        (t,) = ctx.saved_tensors
        return g * 3 + 0 * t


class WithFunctions(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 1)

    def forward(self, t):
        return self.b(Scaled.apply(Ste.apply(self.a(t))))


def test_custom_autograd_function_keeps_its_backward():
    torch.manual_seed(0)
    m, t = WithFunctions(), torch.randn(64, 32)
    om = memfit.optimize(m, None, example_inputs=(t,), loss_fn=lambda o: o.sum())
    targets = [n.target for n in om.graph_module.graph.nodes if n.op == "call_function"]
    assert [repr(x) for x in targets] == ["Ste.apply", "Scaled.apply"]
    g_ref = param_grads(m, m(t).sum())
    g_opt = param_grads(om, om(t).sum())
    assert rel_error(g_opt, g_ref) == 0.0 and g_ref["a.weight"].abs().sum() > 0
    # its saved tensor is planned like any other (bytes of ctx.save_for_backward)
    p = memfit.plan(m, example_inputs=(t,), loss_fn=lambda o: o.sum(), symbolic=False)
    meas = memfit.measure(m, example_inputs=(t,), loss_fn=lambda o: o.sum())
    assert p.categories["saved_activations"] == meas.saved_activations


def test_custom_autograd_function_on_the_export_road_is_refused():
    with pytest.raises(CaptureError, match="Ste.*drops its backward"):
        memfit.plan(WithFunctions(), example_inputs=(torch.randn(4, 32),), capture_method="export")


# --- copies and budgets ---------------------------------------------------------------------

def test_deepcopy_after_optimize_in_place_runs_its_own_weights():
    from examples.gpt2_like import loss_fn, make

    torch.manual_seed(0)
    model, (x,) = make(batch_size=4, seq_len=64, layers=2, d=32, heads=2, vocab=64, dropout=0.0)
    memfit.optimize_(model, "80%", example_inputs=(x,), loss_fn=loss_fn)
    assert model.memfit_plan.decisions
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for q in ema.parameters():
            q.mul_(0.5)
    loss_fn(ema(x)).backward()
    assert all(q.grad is None for q in model.parameters())          # the original's untouched
    assert all(q.grad is not None for q in ema.parameters())
    plain = copy.deepcopy(ema)
    del plain.__dict__["forward"], plain.__dict__["_memfit_optimized"]
    torch.testing.assert_close(ema(x), type(plain).forward(plain, x))


def test_deepcopy_of_recomputed_regions_calling_modules_trains_the_copy():
    """symbolic_trace graphs recompute regions that call the model's leaf modules: a copy must
    call its own (fx copies call targets as they are; the regions are copied with the module)."""
    from tests.models import Block

    torch.manual_seed(0)
    model = nn.Sequential(Block(32, heads=2), Block(32, heads=2), nn.Linear(32, 8))
    x, y = torch.randn(8, 16, 32), torch.randn(8, 16, 8)
    om = memfit.optimize(model, "85%", example_inputs=(x,), loss_fn=lambda o: F.mse_loss(o, y),
                         techniques="checkpoint")
    assert om._memfit_captured.method == "symbolic_trace"
    assert any(d.action == "recompute" for d in om.memfit_plan.decisions)
    twin = copy.deepcopy(om)
    F.mse_loss(twin(x), y).backward()
    assert all(q.grad is None for q in om.parameters())             # the original's untouched
    assert all(q.grad is not None for q in twin.parameters())


@pytest.mark.parametrize("bad,match", [(float("nan"), "finite"), (float("inf"), "finite"), ("-5%", "positive"),
                                       ("-2GiB", "positive"), (-3, "positive")])
def test_budget_errors_are_memfit_errors(bad, match):
    with pytest.raises(BudgetError, match=match):
        memfit.Budget.parse(bad)


# --- the user's own checkpointing ------------------------------------------------------------

class CkptBlock(nn.Module):
    def __init__(self, reentrant=False):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 32))
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint
        return x + checkpoint(self.f, x, use_reentrant=self.reentrant)


class CkptNet(nn.Module):
    def __init__(self, reentrant=False):
        super().__init__()
        self.blocks = nn.ModuleList(CkptBlock(reentrant) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_users_own_checkpointing_is_kept(method):
    torch.manual_seed(0)
    m, x = CkptNet(), torch.randn(64, 32)
    p = memfit.plan(m, example_inputs=(x,), capture_method=method, symbolic=False)
    assert any("own torch.utils.checkpoint kept: 3" in n for n in p.notes)
    user = memfit.measure(m, example_inputs=(x,))
    assert abs(p.peak_bytes - user.peak_bytes) <= 0.01 * user.peak_bytes
    om = memfit.optimize(m, None, example_inputs=(x,))
    assert memfit.measure(om, example_inputs=(x,)).peak_bytes <= user.peak_bytes
    regions = [n for n in om.graph_module.graph.nodes if n.meta.get("memfit_checkpoint", "").startswith("user")]
    assert len(regions) == 3
    g_ref = param_grads(m, m(x).square().sum())
    g_opt = param_grads(om, om(x).square().sum())
    assert rel_error(g_opt, g_ref) <= 1e-6


def test_reentrant_checkpoint_on_the_export_road_is_refused():
    with pytest.raises(CaptureError, match="use_reentrant=True"):
        memfit.plan(CkptNet(reentrant=True), example_inputs=(torch.randn(4, 32),), capture_method="export")


# --- outputs, dtypes, saving -----------------------------------------------------------------

class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 4)
        self.register_buffer("b", torch.ones(4))

    def forward(self, x):
        return {"out": self.l(x) + self.b, "aux": [x.sum(), x.mean()]}


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_dict_outputs_come_back_as_dicts_and_dtype_changes_replan(method):
    torch.manual_seed(0)
    m, x = DictOut(), torch.randn(2, 4)
    cap = memfit.capture(m, (x,), method=method, dynamic=False)
    o = memfit.OptimizedModule(m, cap)(x)
    assert type(o) is dict and type(o["aux"]) is list
    om = memfit.optimize(m, None, example_inputs=(x,), loss_fn=lambda o: o["out"].sum())
    m.double()
    out = om(x.double())                     # planned again for float64 inputs
    assert out["out"].dtype == torch.float64
    torch.testing.assert_close(out["out"], m(x.double())["out"])


def test_pickling_an_optimized_module_is_refused_clearly():
    import io

    m, x = DictOut(), torch.randn(2, 4)
    om = memfit.optimize(m, None, example_inputs=(x,))
    with pytest.raises(MemfitError, match="save its state_dict"):
        torch.save(om, io.BytesIO())
    torch.save(om.state_dict(), io.BytesIO())
