"""Token merging through memfit.optimize (explicit pipeline and as an allowed technique)."""

import torch

import memfit
from memfit.rewrites.token_merge import apply_token_merging
from tests.tome_vit import SmallViT


def test_optimize_with_token_merge_pipeline_trains_the_users_parameters():
    torch.manual_seed(0)
    m = SmallViT(layers=2)
    x = torch.randn(2, 3, 32, 32)
    base_plan = memfit.plan(m, example_inputs=(x,), symbolic=False)
    opt = memfit.optimize(m, passes="token-merge{r=16}", example_inputs=(x,))
    assert opt.state_dict().keys() == m.state_dict().keys()
    assert any(d.target == "token-merge" and d.action == "blocks_patched" and d.detail == "2"
               for d in opt.memfit_plan.decisions)
    # the plan of the merged graph predicts fewer saved bytes than the unmerged model's
    assert opt.memfit_plan.categories["saved_activations"] < base_plan.categories["saved_activations"]
    out = opt(x)
    torch.testing.assert_close(out, apply_token_merging(m, 16)(x), rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_optimize_token_merge_on_exported_transformers_vit():
    pytest = __import__("pytest")
    pytest.importorskip("transformers")
    from examples.hf_models import vit

    torch.manual_seed(0)
    m, (x,) = vit(batch_size=2, image_size=32, layers=2, d=32, heads=4)
    opt = memfit.optimize(m, passes="token-merge{r=8}", example_inputs=(x,))
    assert opt.graph_module.meta["token_merge"]["tokens_per_layer"] == [17, 9, 5]
    # transformers' traced all-attend mask for 17 tokens must not reach the merged blocks
    torch.testing.assert_close(opt(x).logits, apply_token_merging(m, 8)(x).logits, rtol=1e-6, atol=1e-6)


def test_r_is_chosen_from_the_budget():
    """techniques=["token_merge"] with a budget: the smallest r tried whose merged step meets the
    budget by itself (r one candidate smaller does not), said in the plan; the module is the
    ToMe model at that r."""
    from memfit.planning.strategy import R_CANDIDATES

    torch.manual_seed(0)
    m = SmallViT(layers=4)
    x = torch.randn(4, 3, 32, 32)

    def peak(r):
        return memfit.plan(apply_token_merging(m, r), example_inputs=(x,), symbolic=False).peak_bytes

    base = memfit.plan(m, example_inputs=(x,), symbolic=False).peak_bytes
    budget = (peak(4) + peak(6)) // 2          # between r=4's and r=6's peaks
    opt = memfit.optimize(m, budget, example_inputs=(x,), techniques=["token_merge"])
    (d,) = [d for d in opt.memfit_plan.decisions if d.action == "token-merge"]
    assert "r=6: the smallest r tried that meets the budget by itself" in d.detail, d.detail
    assert R_CANDIDATES.index(6) == R_CANDIDATES.index(4) + 1 and peak(4) > budget >= peak(6) and base > budget
    assert opt.memfit_plan.peak_bytes <= budget
    torch.testing.assert_close(opt(x), apply_token_merging(m, 6)(x), rtol=1e-6, atol=1e-6)
