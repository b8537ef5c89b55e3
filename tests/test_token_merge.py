"""Token merging (ToMe): runtime math, the module rewrite and the token-merge pass."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memfit.errors import PassError
from memfit.passes import PassContext, PassManager, parse_pipeline
from memfit.passes.infra.pipeline import run_pipeline
from memfit.rewrites.token_merge import (TokenMerge, apply_token_merging, find_blocks, model_tokens_per_layer,
                                       token_merge_pass_info)
from memfit.runtime.token_merge import (attention_bias, bipartite_soft_matching, merge_wavg, merged_r,
                                        r_schedule, token_merge_step, tokens_per_layer, unmerge, unmerge_all)
from tests.tome_vit import SmallViT



def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, x, fn=lambda out: out.float().pow(2).mean()):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out = getattr(out, "logits", out)
    fn(out).backward()
    return out.detach(), _grads(model)


def _hf(kind="vit", impl="eager", layers=2):
    tf = pytest.importorskip("transformers")
    cfg_cls = tf.ViTConfig if kind == "vit" else tf.DeiTConfig
    cfg = cfg_cls(num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                  image_size=32, patch_size=4, num_labels=10, attn_implementation=impl)
    model_cls = tf.ViTForImageClassification if kind == "vit" else tf.DeiTForImageClassificationWithTeacher
    model = model_cls(cfg).train()
    if not find_blocks(model)[0]:
        pytest.skip(f"transformers {tf.__version__}: ViT layer layout before 5.x (attention.attention.query) "
                    "is not supported")
    return model


# --- runtime ----------------------------------------------------------------------------------

@pytest.mark.parametrize("N,protected", [(17, 1), (18, 1), (18, 2), (9, 0)])
def test_merge_keeps_mass_sizes_and_protected_tokens(N, protected):
    x, k = torch.randn(3, N, 8), torch.randn(3, 2, N, 5)
    r = 4
    y, size, info = token_merge_step(x, k, None, r, protected)
    n_out = N - merged_r(N, r, protected)
    assert y.shape == (3, n_out, 8) and size.shape == (3, n_out, 1)
    assert torch.equal(size.sum(1), torch.full((3, 1), float(N)))          # every token accounted once
    torch.testing.assert_close((y * size).sum(1), x.sum(1), rtol=1e-5, atol=1e-5)  # weighted average
    assert torch.equal(y[:, :protected], x[:, :protected])                 # protected: same place, untouched
    assert torch.equal(size[:, :protected], torch.ones(3, protected, 1))


def test_r_zero_and_too_few_tokens_are_identity():
    x, k = torch.randn(2, 7, 4), torch.randn(2, 2, 7, 3)
    y, size, info = token_merge_step(x, k, None, 0)
    assert y is x and size is None and info is None
    assert bipartite_soft_matching(torch.randn(2, 2, 4), 5, protected=1) is None  # one free token
    assert merge_wavg(None, x) == (x, None) and unmerge(None, x) is x
    assert merged_r(65, 100, 1) == 32


def test_matching_merges_most_similar_pairs_deterministically():
    # tokens 1,2 (A then B after the class token) are near copies; 3,4 are far apart
    base = torch.randn(1, 5, 6)
    base[0, 2] = base[0, 1] + 1e-3
    base[0, 4] = -base[0, 3]
    info = bipartite_soft_matching(base, 1, protected=1)
    assert info.src_idx.flatten().tolist() == [0] and info.dst_idx.flatten().tolist() == [0]
    again = bipartite_soft_matching(base.clone(), 1, protected=1)
    assert all(torch.equal(a, b) for a, b in [(info.unm_idx, again.unm_idx), (info.src_idx, again.src_idx),
                                               (info.dst_idx, again.dst_idx)])


def test_r_schedules():
    assert r_schedule(8, 4) == [8, 8, 8, 8]
    dec = r_schedule(4, 6, "decreasing")
    assert dec == sorted(dec, reverse=True) and dec[0] == 8 and dec[-1] == 0 and sum(dec) == 24
    assert r_schedule([3, 2, 1], 3) == [3, 2, 1]
    assert tokens_per_layer(65, [8, 8, 40]) == [65, 57, 49, 25]
    for bad in ([1, 2], -1, 2.5):
        with pytest.raises(ValueError):
            r_schedule(bad, 3)


@pytest.mark.parametrize("sdpa", [False, True])
def test_proportional_attention_equals_attention_over_duplicates(sdpa):
    # one token standing for 3 identical tokens gets the weight of the 3 copies (ToMe eq. 1)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8)
    rep = torch.tensor([0, 1, 1, 1, 2, 3, 3])
    size = torch.tensor([1.0, 3.0, 1.0, 2.0]).view(1, 4, 1).expand(2, 4, 1)
    bias = attention_bias(size)
    assert bias.shape == (2, 1, 1, 4)
    full = torch.softmax(q @ k[:, :, rep].transpose(-1, -2) * 8 ** -0.5, -1) @ v[:, :, rep]
    if sdpa:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        got = torch.softmax(q @ k.transpose(-1, -2) * 8 ** -0.5 + bias, -1) @ v
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N", [17, 18])
def test_unmerge_restores_shape_and_copies_merged_values(N):
    x, k = torch.randn(2, N, 4), torch.randn(2, 2, N, 3)
    infos, y, size = [], x, None
    for _ in range(2):
        y, size, info = token_merge_step(y, k[:, :, : y.shape[1]], size, 3)
        infos.append(info)
    back = unmerge_all(infos, y)
    assert back.shape == x.shape
    assert torch.equal(back[:, 0], y[:, 0])
    # every restored token carries the value of one merged token; tokens never merged are exact
    for b in range(2):
        for t in range(N):
            assert any(torch.equal(back[b, t], y[b, j]) for j in range(y.shape[1]))
    assert ((back - x).abs().sum(-1) < 1e-6).sum() >= N - 2 * 2 * 3


# --- module rewrite: identity at r = 0 ----------------------------------------------------

def _assert_same_step(m, m2, x, exact=True):
    out1, g1 = _step(m, x)
    out2, g2 = _step(m2, x)
    assert g1.keys() == g2.keys()
    if exact:
        assert torch.equal(out1, out2)
        assert all(torch.equal(g1[n], g2[n]) for n in g1)
    else:
        torch.testing.assert_close(out2, out1, rtol=1e-6, atol=1e-6)
        for n in g1:
            torch.testing.assert_close(g2[n], g1[n], rtol=1e-5, atol=1e-6)


def _examples_vit():
    from examples.vit_like import ViT

    return ViT(image_size=32, patch=4, classes=10, layers=2, d=32, heads=4)


@pytest.mark.parametrize("make", [
    lambda: SmallViT(),
    _examples_vit,
    lambda: SmallViT(distill=True),
    lambda: _hf("vit", "eager"),
    lambda: _hf("vit", "sdpa"),
    lambda: _hf("deit", "eager"),
], ids=["small_vit", "examples_vit_like", "deit_like", "hf_vit_eager", "hf_vit_sdpa", "hf_deit"])
def test_r0_is_the_original_model(make):
    m = make()
    x = torch.randn(2, 3, 32, 32)
    m2 = apply_token_merging(m, 0)
    assert m2.state_dict().keys() == m.state_dict().keys()
    assert all(a is b for a, b in zip(m.parameters(), m2.parameters()))
    assert not any(type(b).__name__.startswith("TokenMerging") for b in m.modules())  # user's model untouched
    assert len(m2.memfit_token_merge.blocks) == (4 if isinstance(m, SmallViT) else 2)
    assert m2.memfit_token_merge.skipped == ()
    _assert_same_step(m, m2, x, exact=True)


def test_r0_with_sdpa_and_unmerge_is_the_original_model():
    m = SmallViT(dense=True)
    x = torch.randn(2, 3, 32, 32)
    _assert_same_step(m, apply_token_merging(m, 0, sdpa=True, unmerge=True), x, exact=False)
    _assert_same_step(m, apply_token_merging(m, 0, unmerge=True), x, exact=True)


# --- module rewrite: r > 0 ------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: SmallViT(), lambda: _hf("vit", "sdpa"), lambda: _hf("deit", "eager")],
                         ids=["vit_like", "hf_vit_sdpa", "hf_deit"])
def test_gradients_flow_through_merges(make):
    m = make()
    m2 = apply_token_merging(m, 8, schedule="decreasing")
    out, g = _step(m2, torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all()
    params = [n for n, p in m.named_parameters() if p.requires_grad]
    if type(m).__name__ == "DeiTForImageClassificationWithTeacher":
        params = [n for n in params if "mask_token" not in n]  # unused without bool_masked_pos
    assert set(params) <= set(g)
    for n in params:
        assert torch.isfinite(g[n]).all() and g[n].abs().sum() > 0, n
    # merging changed the function and the token counts
    assert model_tokens_per_layer(m2, torch.randn(2, 3, 32, 32))[-1] < 64


class CheckpointedViT(SmallViT):
    calls = []

    def _run(self, block, x):
        self.calls.append(1)
        return block(x)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(self._run, block, x, use_reentrant=False)
        return self.head(self.norm(x)[:, 0])


def test_checkpoint_recompute_gives_identical_merges():
    m = SmallViT()
    mc = CheckpointedViT()
    mc.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a, b = apply_token_merging(m, 6), apply_token_merging(mc, 6)
    calls = CheckpointedViT.calls = []
    out1, g1 = _step(a, x)
    out2, g2 = _step(b, x)
    assert len(calls) == 2 * len(b.blocks)  # forward + recompute: the checkpoint really recomputed
    assert torch.equal(out1, out2)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-6, atol=1e-7)


def test_hf_activation_checkpointing_composes(monkeypatch):
    import memfit.rewrites.token_merge as tm

    m = _hf("vit", "eager")
    mc = _hf("vit", "eager")
    mc.load_state_dict(m.state_dict())
    if hasattr(mc, "activation_checkpointing_enable"):  # transformers >= 5.x
        mc.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        mc.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    x = torch.randn(2, 3, 32, 32)
    out1, g1 = _step(apply_token_merging(m, 8), x)
    calls = []
    step = tm.token_merge_step
    monkeypatch.setattr(tm, "token_merge_step", lambda *a: calls.append(1) or step(*a))
    out2, g2 = _step(apply_token_merging(mc, 8), x)
    assert len(calls) == 4  # 2 blocks, each merged in forward and again in the recompute
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-6, atol=1e-7)


def test_sdpa_matches_explicit_attention_with_merging():
    m = SmallViT()
    x = torch.randn(2, 3, 32, 32)
    out1, g1 = _step(apply_token_merging(m, 8), x)
    out2, g2 = _step(apply_token_merging(m, 8, sdpa=True), x)
    torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-5)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-4, atol=1e-5)
    h = _hf("vit", "eager")
    hs = _hf("vit", "sdpa")
    hs.load_state_dict(h.state_dict())
    o1 = apply_token_merging(h.eval(), 8)(x).logits
    o2 = apply_token_merging(hs.eval(), 8)(x).logits
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)


def test_proportional_attention_is_used():
    m = SmallViT()
    x = torch.randn(2, 3, 32, 32)
    on = apply_token_merging(m, 8)(x)
    off = apply_token_merging(m, 8, prop_attn=False)(x)
    assert not torch.allclose(on, off)


def test_unmerge_restores_tokens_for_dense_heads():
    m = SmallViT(dense=True)
    x = torch.randn(2, 3, 32, 32)
    m2 = apply_token_merging(m, 8, unmerge=True)
    out, g = _step(m2, x)
    assert out.shape == m(x).shape == (2, 65, 10)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in g.values())
    # without unmerge the dense head would see fewer tokens
    assert apply_token_merging(m, 8)(x).shape == (2, 33, 10)


def test_class_and_distillation_tokens_keep_their_positions():
    for distill, protected in [(False, 1), (True, 2)]:
        m = SmallViT(distill=distill, d=32)
        m2 = apply_token_merging(m, 8)
        assert m2.memfit_token_merge.protected == protected
        tokens = model_tokens_per_layer(m2, torch.randn(2, 3, 32, 32))
        assert tokens == tokens_per_layer(64 + protected, [8] * 4, protected)
        rec = m2.blocks[0]._memfit_tome.record
        for i in range(len(m2.blocks)):  # the special tokens lead and still stand for one token
            assert rec.sizes[i].shape[1] == tokens[i + 1]
            assert torch.equal(rec.sizes[i][:, :protected], torch.ones(2, protected, 1))
            assert (rec.sizes[i][:, protected:] >= 1).all() and (rec.sizes[i][:, protected:] > 1).any()


def test_tokens_per_layer_reported():
    m = SmallViT()
    x = torch.randn(2, 3, 32, 32)
    m2 = apply_token_merging(m, [8, 4, 0, 16])
    seen = []
    for blk in m2.blocks:
        blk.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    tokens = model_tokens_per_layer(m2, x)
    assert tokens[:-1] == seen
    assert tokens == m2.memfit_token_merge.tokens_per_layer(65) == [65, 57, 53, 53, 37]


def test_bad_input_gives_clear_errors():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(PassError, match="no supported transformer block"):
        apply_token_merging(NoBlocks(), 4)
    with pytest.raises(PassError, match="entries"):
        apply_token_merging(SmallViT(), [1, 2])
    with pytest.raises(PassError, match="r must be"):
        apply_token_merging(SmallViT(), -1)
    with pytest.raises(PassError, match="r must be"):
        parse_pipeline("token-merge{r=-2}")


# --- the pass ---------------------------------------------------------------------------------

def test_token_merge_pass_on_captured_vit():
    from memfit.ir.capture import capture

    m = SmallViT()
    x = torch.randn(2, 3, 32, 32)
    cap, res = run_pipeline(m, (x,), None, "token-merge{r=8}", method="symbolic_trace")
    assert res.stats == {"token-merge.blocks_patched": 4, "token-merge.tokens_merged": 32}
    assert token_merge_pass_info(res.gm)["tokens_per_layer"] == [65, 57, 49, 41, 33]
    n_merge = sum(1 for n in res.gm.graph.nodes if n.op == "call_function" and n.target is
                  __import__("memfit.runtime.token_merge", fromlist=["x"]).token_merge_step)
    assert n_merge == 4
    torch.testing.assert_close(res.gm(x)[0], apply_token_merging(m, 8)(x), rtol=1e-6, atol=1e-6)
    assert cap.gm is res.gm
    # r = 0: model untouched; on a captured graph: refused (a source rewrite runs before capture)
    res0 = TokenMerge(r=0).apply(m, (x,))
    assert res0.model is m and not res0.modified
    with pytest.raises(PassError, match="source module"):
        TokenMerge().run(cap.gm, PassContext(captured=capture(m, (x,), method="symbolic_trace")))


def test_graph_passes_named_before_run_on_the_merged_graph():
    m = SmallViT(layers=2)
    x = torch.randn(2, 3, 32, 32)
    _, res = run_pipeline(m, (x,), None, "sdpa-attention,token-merge{r=8}", method="symbolic_trace")
    targets = [n.target for n in res.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(F.scaled_dot_product_attention) == 2       # on the merged graph
    assert sum(getattr(t, "__name__", "") == "token_merge_step" for t in targets) == 2
    assert res.stats["token-merge.blocks_patched"] == 2
    assert any("before capture" in d.message for d in res.diagnostics)
    torch.testing.assert_close(res.gm(x)[0], apply_token_merging(m, 8)(x), rtol=1e-5, atol=1e-5)


def test_unsupported_block_layout_is_a_diagnostic():
    class DropPath(nn.Module):
        def forward(self, x):
            return x

    m = SmallViT(layers=2)
    m.blocks[1].drop_path = DropPath()  # a module our forward would not replay
    x = torch.randn(1, 3, 32, 32)
    res = TokenMerge(r=4).apply(m, (x,))
    assert res.stats["blocks_patched"] == 1
    assert any(d.node == "blocks.1" and "unsupported" in d.message for d in res.diagnostics)
    res = TokenMerge(rs=(24, 24)).apply(SmallViT(layers=2), (x,))
    clamped = [d for d in res.diagnostics if "asked" in d.message]
    assert [d.node for d in clamped] == ["blocks.1"]  # 65 -> 41, then at most 20 of 40
    assert res.meta["token_merge"]["tokens_per_layer"] == [65, 41, 21]


def test_pass_text_form_round_trips():
    (p,) = parse_pipeline("token-merge{rs=8:4:0,unmerge=true,schedule=decreasing}")
    assert p.rs == (8, 4, 0) and p.unmerge and p.promise.kind == "changes_function"
    assert parse_pipeline(p.to_text()) == [p]
