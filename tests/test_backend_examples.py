"""The torch.compile backend on the repository's example models (examples/): budgets met per
graph, gradients as promised, BatchNorm running statistics updated once per step."""

import copy
import warnings

import pytest
import torch

import memfit.compile as mb
from tests.grad_utils import param_grads, rel_error
from examples import gpt2_like, resnet_like, vit_like

warnings.filterwarnings("ignore", category=FutureWarning)
pytestmark = pytest.mark.slow


def _compile(model, budget, **kw):
    torch._dynamo.reset()
    mb.clear_reports()
    return torch.compile(model, backend=mb.make_backend(budget, codegen="eager", **kw))


def _partitions():
    return [p for r in mb.reports() for p in r.partitions]


@pytest.mark.parametrize("name,make,kw", [
    ("gpt2_like", gpt2_like.make, dict(batch_size=2, seq_len=32, layers=2, d=64, heads=4, vocab=128, dropout=0.0)),
    ("vit_like", vit_like.make, dict(batch_size=2, image_size=32, layers=2, d=64, heads=4)),
])
def test_transformer_examples_exact_under_budget(name, make, kw):
    """Recompute only (the default when it can fit): every graph's saved bytes within 30% of
    its default partition's, gradients equal eager's within 1e-5 (the default structural
    passes run too: sdpa-attention)."""
    torch.manual_seed(0)
    model, inputs = make(**kw)
    mod = gpt2_like if name == "gpt2_like" else vit_like
    ref = param_grads(model, mod.loss_fn(model(*inputs)))
    compiled = _compile(model, "30%")
    g = param_grads(model, mod.loss_fn(compiled(*inputs)))
    parts = _partitions()
    assert parts and all(p.fits and p.saved_bytes <= p.target_bytes < p.baseline_saved_bytes for p in parts)
    assert not any(p.quantized for p in parts)
    assert any(r.pass_stats.get("sdpa-attention.rewritten", 0) > 0 for r in mb.reports())
    assert g.keys() == ref.keys() and rel_error(g, ref) < 1e-5


def test_resnet_example_batchnorm_statistics_update_once():
    """Training-mode BatchNorm under a 30% budget: recomputing a batch_norm in backward must
    not update the running statistics a second time; they equal eager's after one step, and
    gradients match eager's."""
    torch.manual_seed(0)
    model, (x,) = resnet_like.make(batch_size=4, image_size=32, width=8)
    eager = copy.deepcopy(model)
    ref = param_grads(eager, resnet_like.loss_fn(eager(x)))
    compiled = _compile(model, "30%")
    g = param_grads(model, resnet_like.loss_fn(compiled(x)))
    parts = _partitions()
    assert parts and all(p.fits for p in parts)
    assert any(p.recomputed_nodes > p.baseline_recomputed_nodes for p in parts)
    assert rel_error(g, ref) < 1e-4
    for (k, b), (_, b_ref) in zip(model.named_buffers(), eager.named_buffers()):
        torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6, msg=k)
