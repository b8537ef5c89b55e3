"""memfit.optimize and the torch.compile backend on Hugging Face transformers models
(examples/hf_models.py: small configs, random weights, no downloads)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import memfit
import memfit.compile as mb
from tests.grad_utils import param_grads, rel_error

pytest.importorskip("transformers")
from examples import hf_models  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.slow


def test_optimize_gpt2_meets_budget_measured_and_exact():
    """HF GPT-2 with its dropout on: optimize at 60% of the predicted peak; the measured
    step peak is within the budget, the prediction within 5% of the measurement, and
    gradients equal the unmodified model's (same seed: checkpointing replays the masks)."""
    torch.manual_seed(0)
    model, inputs = hf_models.gpt2(batch_size=2, seq_len=64, layers=2, d=64, heads=4)
    om = memfit.optimize(model, "60%", example_inputs=inputs, optimizer="sgd", loss_fn=hf_models.loss_fn)
    p = om.memfit_plan
    assert p.fits and p.decisions
    m = memfit.measure(om, example_inputs=inputs, optimizer="sgd", loss_fn=hf_models.loss_fn)
    assert m.peak_bytes <= p.budget_bytes
    assert abs(p.peak_bytes - m.peak_bytes) <= 0.05 * m.peak_bytes
    torch.manual_seed(1)
    g_opt = param_grads(om, hf_models.loss_fn(om(*inputs)))
    torch.manual_seed(1)
    g_ref = param_grads(model, hf_models.loss_fn(model(*inputs)))
    assert g_opt.keys() == g_ref.keys() and rel_error(g_opt, g_ref) < 1e-5


@pytest.mark.parametrize("quantize", ["never", "prefer"])
def test_backend_on_bert(quantize):
    """torch.compile(backend=memfit) on HF BERT (dropout off, so eager is the reference):
    each graph's saved bytes fit 40% of its default partition; recompute only is exact,
    quantize="prefer" keeps gradient cosine >= 0.99 per parameter."""
    torch.manual_seed(0)
    model, (ids,) = hf_models.bert(batch_size=2, seq_len=32, layers=2, d=64, heads=4)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    g_ref = param_grads(model, hf_models.loss_fn(model(ids)))
    torch._dynamo.reset()
    mb.clear_reports()
    compiled = torch.compile(model, backend=mb.make_backend("40%", codegen="eager", quantize=quantize,
                                                            quantize_min_bytes=1024))
    g = param_grads(model, hf_models.loss_fn(compiled(ids)))
    parts = [p for r in mb.reports() for p in r.partitions]
    assert parts and all(p.fits and p.saved_bytes <= p.target_bytes for p in parts)
    assert sum(p.saved_bytes for p in parts) < sum(p.baseline_saved_bytes for p in parts)
    assert g.keys() == g_ref.keys()
    if quantize == "never":
        assert not any(p.quantized for p in parts)
        assert rel_error(g, g_ref) < 1e-5
    else:
        assert any(p.quantized for p in parts)
        # The attention key biases get gradient 0 in exact arithmetic (softmax ignores a
        # constant added to every score of a row): their reference is rounding noise
        # (~1e-12), so a cosine there means nothing; they are held to an absolute bound.
        top = max(v.norm().item() for v in g_ref.values())
        tiny = {k for k in g_ref if g_ref[k].norm().item() < 1e-6 * top}
        assert tiny == {f"bert.encoder.layer.{i}.attention.self.key.bias" for i in range(2)}
        assert all(g[k].norm().item() < 1e-5 * top for k in tiny)
        cos = min(F.cosine_similarity(g[k].flatten().double(), g_ref[k].flatten().double(), 0).item()
                  for k in g_ref if k not in tiny)
        assert cos >= 0.99
