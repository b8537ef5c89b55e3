"""Training parity: a character-level LM on the repository's own text, 8-bit saved
activations against unquantized, same seed and batches: final held-out loss within 2%."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

from quantize_parity import corpus, train  # noqa: E402


def test_8bit_final_loss_within_2_percent():
    text = corpus()
    kw = dict(steps=50, seed=0, batch=8, block=32, d=32, layers=2, eval_every=10, lr=1e-2, text=text,
              min_bytes=1024)
    base = train(None, **kw)
    q8 = train(8, **kw)
    b, q = base["eval"][-1][1], q8["eval"][-1][1]
    assert abs(q - b) <= 0.02 * b, (b, q)
    # it learned something (the comparison is not between two untrained models)
    assert b < base["eval"][0][1] - 0.2, base["eval"]
    # and the runs did differ: quantization changed the numerics
    assert base["train"] != q8["train"]
