"""Reversible pass on models: MEFT start point on a transformers GPT-2 and on a hand-written
stack (the exact recursion of the construction), and saved-activation bytes flat in depth."""

import pytest
import torch
from torch import nn

from memfit.cost_models.measure import measure
from memfit.passes.reversible import make_reversible, stacks
from tests.models import BlockStack
from tests.test_reversible import grad_pair


def Stack(n=4):  # noqa: N802 - reads like the model class it builds
    return BlockStack(n, d=32)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("aux", ["copy", "delta"])
def test_meft_follows_its_recursion(aux):
    # copy:  a_{i+1} = L_i(a_i) + lam * b_i,  b_{i+1} = beta * a_i,               b_0 = 0
    # delta: a_{i+1} = L_i(a_i) + lam * b_i,  b_{i+1} = beta * (a_i - a_{i+1}),   b_0 = 0
    torch.manual_seed(0)
    m = Stack(5)
    x = torch.randn(2, 6, 32)
    lam, beta = 0.05, 0.7
    rev = make_reversible(m, (x,), mode="meft", lam=lam, beta=beta, aux=aux)
    with torch.no_grad():
        a, b = x, torch.zeros_like(x)
        for blk in m.blocks:
            a_new = blk(a) + lam * b
            b = beta * a if aux == "copy" else beta * (a - a_new)
            a = a_new
        expect = m.head(a)
        got = rev(x)
        orig = m(x)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
    # The start point: the distance to the original is first order in lam * beta.
    assert 0 < rel(got, orig) < 0.5


def gpt2(n_layer=3):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
                                  use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def test_meft_gpt2_start_point_and_gradients():
    g = gpt2(3)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = g(input_ids=ids).logits
    rev = make_reversible(g, (ids,), mode="meft", lam=0.1, dynamic=False)
    assert rev.pass_result.stats["blocks_converted"] == 3
    assert list(rev.state_dict()) == list(g.state_dict())
    (stack,) = stacks(rev)
    diffs = {}
    for lam in (0.1, 0.01):
        stack.set_scaling(lam=lam)
        with torch.no_grad():
            diffs[lam] = rel(rev(ids).logits, ref)
    # Measured here (CPU, fp32): 0.1 -> about 5e-2, 0.01 -> about 5e-3: linear in lam.
    assert diffs[0.01] < 1e-2
    assert 5 < diffs[0.1] / diffs[0.01] < 20
    # Gradients through reconstruction against the same couplings with stored activations.
    stack.set_scaling(lam=0.1)
    ref_g, got = grad_pair(rev, g, (ids,), loss=lambda out: out.logits.square().mean())
    assert max(rel(a, b) for a, b in zip(got, ref_g)) < 1e-4


def test_pairs_gpt2_like_with_dropout_gradients_match_stored():
    # examples/gpt2_like.py goes through torch.export; dropout 0.1 in every block checks
    # that the replayed RNG state gives the same masks on recomputation.
    from examples.gpt2_like import loss_fn, make

    torch.manual_seed(0)
    model, inputs = make(batch_size=2, seq_len=16, layers=4, d=32, heads=2, vocab=64, dropout=0.1)
    rev = make_reversible(model, inputs, dynamic=False)
    assert rev.pass_result.stats == {"stacks": 1, "blocks_converted": 4, "blocks_skipped": 0, "couplings": 2}
    assert stacks(rev)[0].preserve_rng
    assert list(rev.state_dict()) == list(model.state_dict())
    ref, got = grad_pair(rev, model, inputs, loss=loss_fn)
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-4


def test_saved_activation_bytes_flat_in_depth():
    x = torch.randn(2, 16, 32)
    plain, rev = {}, {}
    for n in (4, 8, 16):
        torch.manual_seed(0)
        m = Stack(n)
        plain[n] = measure(m, example_inputs=(x,)).saved_activations
        rev[n] = measure(make_reversible(m, (x,)), example_inputs=(x,)).saved_activations
    # Unmodified: linear in depth. Reversible: two streams plus the head's input, whatever n.
    assert plain[16] > 3.5 * plain[4] and plain[8] > 1.8 * plain[4]
    assert max(rev.values()) <= 1.10 * min(rev.values())
    assert rev[4] < plain[4] / 2


def test_cost_model_predicts_reversible_saved_bytes():
    # The fake-tensor cost model runs the reversible Function too: its prediction of the
    # rewritten model's saved bytes matches the measurement (anchors included).
    import memfit

    torch.manual_seed(0)
    m = Stack(6)
    x = torch.randn(2, 8, 32)
    opt = memfit.optimize(m, example_inputs=(x,), passes="reversible{mode=meft,anchor_every=3}")
    predicted = opt.memfit_plan.categories["saved_activations"]
    measured = measure(opt, example_inputs=(x,)).saved_activations
    one = 2 * 8 * 32 * 4
    # two final streams (the head reads one of them) + anchors: at coupling 0 the zero aux
    # stream (its other stream is the model's input x, not counted), at coupling 3 both
    assert measured == predicted == 2 * one + 1 * one + 2 * one


def test_resnet_like_auto_detects_blocks_inside_stages():
    # Stages (nn.Sequential of residual blocks) change shape; auto-detection falls back to the
    # blocks inside the stages: stage 0's two same-shape blocks become one coupling, the
    # downsampling first block of each later stage is skipped with a diagnostic.
    from examples.resnet_like import make

    torch.manual_seed(0)
    model, inputs = make(batch_size=2, image_size=32, width=8, freeze_bn=True)
    rev = make_reversible(model, inputs)
    assert rev.pass_result.stats == {"stacks": 1, "blocks_converted": 2, "blocks_skipped": 6, "couplings": 1}
    assert stacks(rev)[0].names == ["stages.0.0", "stages.0.1"]
    msgs = [d.message for d in rev.pass_result.diagnostics]
    assert sum("changes the shape" in m for m in msgs) == 3
    ref, got = grad_pair(rev, model, inputs)
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-4
