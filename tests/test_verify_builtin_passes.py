"""Verify mode over the built-in passes on small example models: each keeps its promise (no
false alarm from the verifier), rewrites something, and leaves the user's model as it was."""

import os

import pytest
import torch

from memfit.ir.capture import capture
from memfit.cli.util import load_factory
from memfit.passes import PassContext, PassManager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = [
    ("examples/resnet_like.py:make", dict(freeze_bn=True, batch_size=2, image_size=16, width=8), "fuse-conv-bn",
     "fuse-conv-bn.tune"),
    ("examples/gpt2_like.py:make", dict(layers=1, d=32, seq_len=16, batch_size=2), "sdpa-attention{allow_dropout=true}",
     "sdpa-attention.rewritten"),
    ("examples/gpt2_like.py:make", dict(layers=1, d=32, seq_len=16, batch_size=2), "quantize-activations{min_bytes=256}",
     "quantize-activations.tensors"),
]


@pytest.mark.parametrize("spec, kwargs, pipeline, stat", CASES, ids=[c[2].split("{")[0] for c in CASES])
def test_builtin_pass_keeps_its_promise(spec, kwargs, pipeline, stat):
    model, inputs, kw = load_factory(os.path.join(ROOT, spec), None, kwargs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cap = capture(model, inputs, kw, dynamic=False)
    res = PassManager(pipeline, verify=True).run(cap.gm, PassContext(captured=cap))
    assert res.stats[stat] > 0, res.stats
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
