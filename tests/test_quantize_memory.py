"""Saved-activation bytes at 8 bits, measured (memfit.measure) and predicted (analyze_step),
on the GPT-2-like and ViT-like examples: <= 0.3x of the unquantized step for fp32, <= 0.55x
for bf16, prediction within 3% of measurement."""

import pytest
import torch

import memfit
from memfit.ir.capture import capture
from memfit.ir.module import OptimizedModule
from memfit.cost_models.memory import analyze_step
from memfit.passes import PassContext
from memfit.passes.quantize import QuantizeActivations
from tests.test_examples import load

# Small sizes; the vocabulary is kept small so that the loss's own saved log-softmax
# (outside the captured graph, never quantized) stays a few percent of the step.
SIZES = {
    "gpt2_like": dict(batch_size=2, seq_len=64, layers=2, d=64, heads=4, vocab=128),
    "vit_like": dict(batch_size=4, image_size=32, layers=2, d=64, heads=4),
}
LIMIT = {torch.float32: 0.30, torch.bfloat16: 0.55}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(SIZES))
def test_saved_bytes_ratio_and_prediction(name, dtype):
    mod = load(name)
    torch.manual_seed(0)
    model, inputs = mod.make(**SIZES[name])
    model = model.to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    cap = capture(model, inputs, dynamic=False)
    base = memfit.measure(OptimizedModule(model, cap), example_inputs=inputs, loss_fn=mod.loss_fn)
    res = QuantizeActivations().run(cap.gm, PassContext(captured=cap))
    assert res.stats["headwise_tensors"] > 0
    cap.gm = res.gm
    meas = memfit.measure(OptimizedModule(model, cap), example_inputs=inputs, loss_fn=mod.loss_fn)
    pred = analyze_step(cap, loss_fn=mod.loss_fn, symbolic=False).totals["saved_activations"]
    ratio = meas.saved_activations / base.saved_activations
    assert ratio <= LIMIT[dtype], (name, dtype, base.saved_activations, meas.saved_activations)
    assert abs(pred - meas.saved_activations) <= 0.03 * meas.saved_activations, (pred, meas.saved_activations)
