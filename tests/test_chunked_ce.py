"""chunked-ce: output projection + cross-entropy in chunks of rows (memfit/passes/chunked_ce.py,
memfit/runtime/chunked_ce.py): exact numerics, rewrite counts on both capture roads, the
planner's use of it, Hugging Face models that return their logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.passes import PassContext, PassManager
from memfit.runtime.chunked_ce import chunked_linear_cross_entropy
from tests.grad_utils import param_grads, rel_error


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_runtime_equals_linear_then_cross_entropy(reduction, label_smoothing, bias, chunk):
    torch.manual_seed(0)
    n, d, v = 37, 16, 53
    h = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    b = torch.randn(v, dtype=torch.float64, requires_grad=True) if bias else None
    t = torch.randint(0, v, (n,))
    t[::5] = -100                                        # ignored rows
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction, label_smoothing=label_smoothing)
    got = chunked_linear_cross_entropy(h, w, b, t, {"none": 0, "mean": 1, "sum": 2}[reduction], -100,
                                       label_smoothing, None, chunk)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    wrt = [h, w] + ([b] if bias else [])
    for a, c in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_runtime_upcast_follows_autograd_through_the_cast():
    torch.manual_seed(0)
    h = torch.randn(20, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(30, 8, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 30, (20,))
    ref = F.cross_entropy(F.linear(h, w).float(), t)
    got = chunked_linear_cross_entropy(h, w, None, t, 1, -100, 0.0, torch.float32, 7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)
    for a, c in zip(torch.autograd.grad(got, [h, w]), torch.autograd.grad(ref, [h, w])):
        assert a.dtype == c.dtype == torch.bfloat16
        torch.testing.assert_close(a, c, rtol=2e-2, atol=2e-2)


class LM(nn.Module):
    def __init__(self, vocab=512, d=32, bias=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Sequential(nn.Linear(d, d), nn.GELU())
        self.head = nn.Linear(d, vocab, bias=bias)

    def forward(self, x):
        return self.head(self.mix(self.emb(x)))


def _ce(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100, label_smoothing=0.05)


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
@pytest.mark.parametrize("bias", [False, True])
def test_pass_rewrites_both_roads_exactly(method, bias):
    torch.manual_seed(0)
    model = LM(bias=bias)
    x, y = torch.randint(0, 512, (4, 16)), torch.randint(0, 512, (4, 16))
    y[0, :3] = -100
    step = memfit.with_loss(model, _ce)
    cap = memfit.capture(step, (x, y), method=method, dynamic=False)
    res = PassManager("chunked-ce{chunk_rows=16}", verify=True).run(cap.gm, PassContext(captured=cap))
    assert res.stats == {"chunked-ce.rewritten": 1, "chunked-ce.skipped": 0, "chunked-ce.logits_also_returned": 0}
    targets = [n.target for n in res.gm.graph.nodes if n.op == "call_function"]
    assert chunked_linear_cross_entropy in targets
    # no node computes the whole logits any more
    assert not any(n.target == "head" or n.target is torch.ops.aten.linear.default and
                   n.meta["val"].shape[-1] == 512 for n in res.gm.graph.nodes)
    om = memfit.OptimizedModule(step, cap, res.gm)
    g_ref = param_grads(model, _ce(model(x), y))
    g_opt = param_grads(om, om(x, y))
    assert rel_error(g_opt, g_ref) < 1e-5


def test_skips_class_weights_with_a_diagnostic():
    torch.manual_seed(0)
    model = LM()
    wts = torch.rand(512)
    step = memfit.with_loss(model, lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), weight=wts))
    x, y = torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8))
    cap = memfit.capture(step, (x, y), method="symbolic_trace", dynamic=False)
    res = PassManager("chunked-ce").run(cap.gm, PassContext(captured=cap))
    assert res.stats["chunked-ce.rewritten"] == 0 and res.stats["chunked-ce.skipped"] == 1
    assert "class weights" in res.diagnostics[0].message


def test_planner_chooses_it_and_the_measured_peak_falls():
    from examples.gpt2_like import make

    torch.manual_seed(0)
    model, (x,) = make(batch_size=4, seq_len=64, layers=2, d=32, heads=2, vocab=2048, dropout=0.0)
    y = x.roll(-1, dims=1)
    step = memfit.with_loss(model, lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()))
    base = memfit.measure(step, example_inputs=(x, y), optimizer="adamw")
    om = memfit.optimize(step, "80%", example_inputs=(x, y), optimizer="adamw")
    [d] = [d for d in om.memfit_plan.decisions if d.action == "chunked-ce"]
    assert d.target == "(loss)" and d.saved_bytes > 0 and d.extra_time_s > 0
    m = memfit.measure(om, example_inputs=(x, y), optimizer="adamw")
    assert m.peak_bytes <= om.memfit_plan.budget_bytes < base.peak_bytes
    assert m.peak_bytes == om.memfit_plan.peak_bytes
    g_ref = param_grads(model, step(x, y))
    g_opt = param_grads(om, om(x, y))
    assert rel_error(g_opt, g_ref) < 1e-5


@pytest.mark.transformers
def test_hf_gpt2_given_labels_keeps_its_returned_logits():
    pytest.importorskip("transformers")
    from examples import hf_models

    torch.manual_seed(0)
    model, (ids,) = hf_models.gpt2(batch_size=2, seq_len=32, layers=1, d=32, heads=2)
    cap = memfit.capture(model, (), {"input_ids": ids, "labels": ids}, dynamic=False)
    res = PassManager("chunked-ce").run(cap.gm, PassContext(captured=cap))
    assert res.stats["chunked-ce.rewritten"] == 1 and res.stats["chunked-ce.logits_also_returned"] == 1
    om = memfit.OptimizedModule(model, cap, res.gm)
    torch.manual_seed(1)            # the same dropout masks
    out = om(input_ids=ids, labels=ids)
    torch.manual_seed(1)
    ref = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.manual_seed(2)
    g_opt = param_grads(om, om(input_ids=ids, labels=ids).loss)
    torch.manual_seed(2)
    g_ref = param_grads(model, model(input_ids=ids, labels=ids).loss)
    assert rel_error(g_opt, g_ref) < 1e-5
