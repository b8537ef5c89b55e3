"""Checkpoint exactness on the examples and a transformers model (tiny sizes)."""

import copy

import pytest
import torch

from memfit.ir.capture import capture
from memfit.cost_models.memory import analyze_step
from memfit.ir.module import OptimizedModule
from memfit.passes.checkpoint import apply_spans, call_nodes, discover_runs, price_units


def _build(name):
    if name == "gpt2_like":
        from examples import gpt2_like
        m, x = gpt2_like.make(batch_size=2, seq_len=16, layers=2, d=32, heads=2, vocab=64)   # dropout 0.1
        return m, x, gpt2_like.loss_fn
    if name == "vit_like":
        from examples import vit_like
        m, x = vit_like.make(batch_size=2, image_size=16, layers=2, d=32, heads=2)
        return m, x, vit_like.loss_fn
    if name == "resnet_like":
        from examples import resnet_like
        m, x = resnet_like.make(batch_size=2, image_size=16, width=8)                     # BatchNorm, training
        return m, x, resnet_like.loss_fn
    if name == "hf_gpt2":
        pytest.importorskip("transformers")
        from examples import hf_models
        m, x = hf_models.gpt2(batch_size=2, seq_len=16, layers=2, d=32, heads=2)
        m.config.resid_pdrop = m.config.attn_pdrop = 0.1
        return m, x, hf_models.loss_fn
    raise KeyError(name)


@pytest.mark.parametrize("name", ["gpt2_like", "vit_like", "resnet_like", "hf_gpt2"])
def test_all_units_recomputed_exact(name):
    torch.manual_seed(0)
    model, inputs, loss_fn = _build(name)
    ref = copy.deepcopy(model)
    cap = capture(model, inputs, dynamic=False)     # static shapes: faster export
    analyze_step(cap, loss_fn=loss_fn, symbolic=False)
    units = price_units(cap.gm, discover_runs(cap.gm, call_nodes(cap.gm)))
    assert len(units) >= 4
    spans = tuple((k, k + 1) for k in range(len(units)))
    new, made = apply_spans(cap.gm, units, spans)
    assert len(made) == len(units)
    wrapped = OptimizedModule(model, cap, new)
    params = list(model.parameters())
    torch.manual_seed(3)
    l_ref = loss_fn(ref(*inputs))
    g_ref = torch.autograd.grad(l_ref, list(ref.parameters()))
    torch.manual_seed(3)
    l_new = loss_fn(wrapped(*inputs))
    g_new = torch.autograd.grad(l_new, params)
    assert torch.allclose(l_new, l_ref, rtol=1e-6)
    num = sum((a.double() - b.double()).pow(2).sum() for a, b in zip(g_new, g_ref)).sqrt()
    den = sum(b.double().pow(2).sum() for b in g_ref).sqrt()
    assert float(num / den) < 1e-5
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k          # BatchNorm statistics updated once
