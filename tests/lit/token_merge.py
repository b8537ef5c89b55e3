# RUN: %python %s | filecheck %s
# The token-merge source rewrite on a ViT, captured after it: where the merge, the
# proportional-attention bias and the unmerge land in the graph, the rewrite counts, and what a
# user sees on bad input.
import re

import torch

from memfit.errors import PassError
from memfit.ir.capture import capture
from memfit.passes import PassContext, PassManager
from memfit.passes.infra.pipeline import run_pipeline
from memfit.testing import run
from tests.tome_vit import SmallViT

KEY = re.compile(r"token_merge_step|attention_bias|unmerge_all|_ones_size|softmax|scaled_dot|norm2\(|norm\(|\+ ")


def rewritten(pipeline, **kw):
    torch.manual_seed(0)
    m = SmallViT(layers=2, **kw)
    x = torch.randn(2, 3, 32, 32)
    _, res = run_pipeline(m, (x,), None, pipeline, method="symbolic_trace")
    for line in res.gm.code.splitlines():
        if KEY.search(line) and "wrap(" not in line:
            print(line.split(";")[0].strip())
    print("stats", sorted(res.stats.items()))
    for d in res.diagnostics:
        print(d)
    return res


@run
def test_merge_between_attention_and_mlp():
    rewritten("token-merge{r=4}")
# CHECK-LABEL: TEST: test_merge_between_attention_and_mlp
# block 0: plain attention (all sizes one), residual add, then the merge, then the MLP
# CHECK-NOT: attention_bias
# CHECK: softmax = mul.softmax(dim = -1)
# CHECK: add_1 = add + blocks_0_attn_proj
# CHECK-NEXT: _ones_size = memfit_rewrites_token_merge__ones_size(add_1)
# CHECK-NEXT: token_merge_step = memfit_runtime_token_merge_token_merge_step(add_1, getitem_5, _ones_size, 4, 1)
# CHECK-NEXT: getitem_8 = token_merge_step[0]
# CHECK-NEXT: getitem_9 = token_merge_step[1]
# CHECK: blocks_0_norm2 = getattr(self.blocks, "0").norm2(getitem_8)
# block 1: log(size) bias from block 0's sizes before the softmax, merge after the residual
# CHECK: attention_bias = memfit_runtime_token_merge_attention_bias(getitem_9)
# CHECK-NEXT: add_3 = mul_1 + attention_bias
# CHECK-NEXT: softmax_1 = add_3.softmax(dim = -1)
# CHECK: add_4 = add_2 + blocks_1_attn_proj
# CHECK-NEXT: token_merge_step_1 = memfit_runtime_token_merge_token_merge_step(add_4, getitem_15, getitem_9, 4, 1)
# CHECK: blocks_1_norm2 = getattr(self.blocks, "1").norm2(getitem_18)
# CHECK-NOT: unmerge_all
# CHECK: stats [('token-merge.blocks_patched', 2), ('token-merge.tokens_merged', 8)]
# CHECK-NEXT: info: [token-merge]: tokens per layer: [65, 61, 57]


@run
def test_unmerge_and_per_layer_r():
    rewritten("token-merge{rs=0:6,unmerge=true}", distill=True)
# CHECK-LABEL: TEST: test_unmerge_and_per_layer_r
# r = 0 in block 0: no merge there, and no bias in block 1 either
# CHECK-NOT: token_merge_step =
# CHECK-NOT: attention_bias
# CHECK: add_3 = add_2 + blocks_1_attn_proj
# CHECK-NEXT: _ones_size = memfit_rewrites_token_merge__ones_size(add_3)
# CHECK-NEXT: token_merge_step = memfit_runtime_token_merge_token_merge_step(add_3, {{getitem_[0-9]+}}, _ones_size, 6, 2)
# CHECK: blocks_1_norm2 = getattr(self.blocks, "1").norm2([[X:getitem_[0-9]+]])
# CHECK-NEXT: add_4 = [[X]] + blocks_1_mlp_3
# CHECK-NEXT: unmerge_all = memfit_runtime_token_merge_unmerge_all([None, {{getitem_[0-9]+}}], add_4)
# CHECK-NEXT: norm = self.norm(unmerge_all)
# CHECK: stats [('token-merge.blocks_patched', 2), ('token-merge.tokens_merged', 6)]
# CHECK-NEXT: info: [token-merge]: tokens per layer: [66, 66, 60]


@run
def test_sdpa_pass_runs_after_the_rewrite_and_takes_the_bias_as_mask():
    rewritten("sdpa-attention,token-merge{r=4}")
# CHECK-LABEL: TEST: test_sdpa_pass_runs_after_the_rewrite_and_takes_the_bias_as_mask
# CHECK-NOT: softmax
# CHECK: scaled_dot_product_attention({{.*}}attn_mask = None,
# CHECK: token_merge_step = memfit_runtime_token_merge_token_merge_step
# CHECK: attention_bias = memfit_runtime_token_merge_attention_bias([[S:getitem_[0-9]+]])
# CHECK-NEXT: scaled_dot_product_attention_1 = {{.*}}scaled_dot_product_attention({{.*}}attn_mask = attention_bias,
# CHECK: token_merge_step_1 = memfit_runtime_token_merge_token_merge_step({{.*}}, [[S]], 4, 1)
# CHECK: stats [('sdpa-attention.causal', 0), ('sdpa-attention.causal_mask_dropped', 0), ('sdpa-attention.dropout', 0), ('sdpa-attention.empty_mask_dropped', 0), ('sdpa-attention.masked', 1), ('sdpa-attention.rewritten', 2), ('sdpa-attention.skipped', 0), ('token-merge.blocks_patched', 2), ('token-merge.tokens_merged', 8)]
# CHECK-NEXT: info: [token-merge]: tokens per layer: [65, 61, 57]
# CHECK-NEXT: info: [token-merge]: a source rewrite: ran on the module before capture, ahead of the graph passes


@run
def test_r0_leaves_the_graph_alone():
    rewritten("token-merge{r=0}")
# CHECK-LABEL: TEST: test_r0_leaves_the_graph_alone
# CHECK-NOT: token_merge_step
# CHECK: stats [('token-merge.blocks_patched', 0), ('token-merge.tokens_merged', 0)]
# CHECK-NEXT: info: [token-merge]: r = 0 in every block: model left unchanged


@run
def test_errors():
    m = SmallViT(layers=1)
    x = torch.randn(1, 3, 32, 32)
    cap = capture(m, (x,), method="symbolic_trace")
    try:
        PassManager("token-merge").run(cap.gm, PassContext(captured=cap))
    except PassError as e:
        print("ERROR:", e)
    for model, inputs, pipe in [(torch.nn.Linear(2, 2), (torch.randn(1, 2),), "token-merge"),
                                (m, (x,), "token-merge{rs=1:2}")]:
        try:
            run_pipeline(model, inputs, None, pipe, method="symbolic_trace")
        except PassError as e:
            print("ERROR:", e)
# CHECK-LABEL: TEST: test_errors
# CHECK-NEXT: ERROR: pass 'token-merge' failed (passes run before: none): token-merge rewrites the source module before capture, not a captured graph
# CHECK-NEXT: ERROR: pass 'token-merge' failed (source rewrite, before capture): token merging found no supported transformer block in Linear
# CHECK-NEXT: ERROR: pass 'token-merge{rs=1:2}' failed (source rewrite, before capture): token merging: per-layer r has 2 entries for 1 blocks
