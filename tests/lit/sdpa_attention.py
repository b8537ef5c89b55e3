# RUN: %python %s | filecheck %s
# sdpa-attention: explicit attention becomes one scaled_dot_product_attention node.
import torch
import torch.nn.functional as F
from torch import nn

from memfit.testing import run, show_calls as show
from tests.models import Block
from tests.test_sdpa_attention import Attention

torch.manual_seed(0)


@run
def test_block_export():
    show(Block(16, 2).train(), torch.randn(2, 5, 16), "sdpa-attention", "export")
# CHECK-LABEL: TEST: test_block_export
# CHECK: %transpose_2 = call_function aten.transpose.int(%view_2, 1, 2)
# CHECK-NEXT: %scaled_dot_product_attention_default = call_function aten.scaled_dot_product_attention.default(%transpose, %transpose_1, %transpose_2, None, 0.0, False, scale=0.3535533905932738)
# CHECK-NEXT: %transpose_4 = call_function aten.transpose.int(%scaled_dot_product_attention_default, 1, 2)
# CHECK-NOT: softmax
# CHECK-NOT: aten.matmul
# CHECK: // stats: sdpa-attention.rewritten=1
# CHECK-EMPTY:


@run
def test_block_symbolic_trace():
    show(Block(16, 2).train(), torch.randn(2, 5, 16), "sdpa-attention", "symbolic_trace")
# CHECK-LABEL: TEST: test_block_symbolic_trace
# CHECK: %pow_1 = call_function _operator.pow(%floordiv_3, -0.5)
# CHECK-NEXT: %mul_1 = call_function _operator.mul(1.0, %pow_1)
# CHECK-NEXT: %float_1 = call_function builtins.float(%mul_1)
# CHECK-NEXT: %scaled_dot_product_attention = call_function torch._C._nn.scaled_dot_product_attention(%transpose, %transpose_1, %transpose_2, attn_mask=None, dropout_p=0.0, is_causal=False, scale=%float_1)
# CHECK-NOT: softmax
# CHECK-NOT: call_module drop
# CHECK: // stats: sdpa-attention.rewritten=1


@run
def test_causal_buffer_becomes_is_causal():
    show(Attention(mask="causal_fill").train(), torch.randn(2, 6, 32), "sdpa-attention", "export")
# CHECK-LABEL: TEST: test_causal_buffer_becomes_is_causal
# CHECK: aten.scaled_dot_product_attention.default(%transpose, %transpose_1, %transpose_2, None, 0.0, True, scale=0.35355339059327373)
# CHECK-NOT: masked_fill
# CHECK-NOT: softmax
# CHECK: // stats: sdpa-attention.causal=1 sdpa-attention.rewritten=1


@run
def test_padding_mask_kept():
    keep = torch.ones(2, 6, dtype=torch.long)
    show(Attention(mask="padding_fill", scale="div_after").train(), (torch.randn(2, 6, 32), keep),
         "sdpa-attention", "export")
# CHECK-LABEL: TEST: test_padding_mask_kept
# CHECK: %[[M:logical_not[a-z_0-9]*]] = call_function aten.logical_not.default(%eq)
# CHECK-NEXT: aten.scaled_dot_product_attention.default(%transpose, %transpose_1, %transpose_2, %[[M]], 0.0, False, scale=0.35355339059327373)
# CHECK-NOT: softmax
# CHECK: // stats: sdpa-attention.masked=1 sdpa-attention.rewritten=1


@run
def test_dropout_is_a_diagnostic():
    show(Attention(mask="causal_fill", dropout=0.1).train(), torch.randn(2, 6, 32), "sdpa-attention", "export")
# CHECK-LABEL: TEST: test_dropout_is_a_diagnostic
# CHECK: %softmax = call_function aten.softmax.int(%masked_fill, -1)
# CHECK-NEXT: %dropout = call_function aten.dropout.default(%softmax, 0.1, True)
# CHECK-NOT: scaled_dot_product_attention
# CHECK: // stats: sdpa-attention.skipped=1
# CHECK-NEXT: // info: [sdpa-attention] at softmax: attention dropout p=0.1 in a training graph: SDPA's dropout masks differ from the graph's, so the rewrite matches in distribution only; pass allow_dropout=true to accept


class MaskedSDPA(nn.Module):
    """Calls SDPA with a causal mask it builds from arange (as transformers' sdpa_mask does)."""

    def forward(self, q, k, v):
        t = q.shape[-2]
        i = torch.arange(t)
        keep = (i[:, None] >= i[None, :]).expand(q.shape[0], 1, t, t)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@run
def test_constant_causal_mask_becomes_is_causal():
    qkv = tuple(torch.randn(2, 2, 8, 4) for _ in range(3))
    show(MaskedSDPA(), qkv, "sdpa-attention", "export")
# CHECK-LABEL: TEST: test_constant_causal_mask_becomes_is_causal
# CHECK: aten.scaled_dot_product_attention.default(%q, %k, %v, None, is_causal=True)
# CHECK-NOT: aten.expand
# CHECK: // stats: sdpa-attention.causal_mask_dropped=1
