# RUN: %python %s | filecheck %s
# chunked-ce on both capture roads: the output projection and its cross-entropy become one
# chunked call (no logits node left), options carried over; class weights are a diagnostic.
import torch
import torch.nn.functional as F
from torch import nn

import memfit
from memfit.testing import run, show_calls as show

torch.manual_seed(0)


class LM(nn.Module):
    def __init__(self, vocab=64, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.emb(x))


X, Y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))


def step(**ce_options):
    return memfit.with_loss(LM(), lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), **ce_options))


@run
def test_symbolic_trace_road():
    show(step(label_smoothing=0.1), (X, Y), "chunked-ce", "symbolic_trace")
# CHECK-LABEL: TEST: test_symbolic_trace_road
# CHECK: %emb = call_module emb(%input_0)
# CHECK-NOT: call_module head
# CHECK: %chunked_linear_cross_entropy = call_function memfit.runtime.chunked_ce.chunked_linear_cross_entropy(%emb, %head_weight, %head_bias, %{{.*}}, 1, -100, 0.1, None, 2)
# CHECK-NOT: cross_entropy(
# CHECK: // stats: chunked-ce.rewritten=1


@run
def test_export_road_sum_and_ignore_index():
    show(step(reduction="sum", ignore_index=3), (X, Y), "chunked-ce{chunk_rows=5}", "export")
# CHECK-LABEL: TEST: test_export_road_sum_and_ignore_index
# CHECK: %embedding = call_function aten.embedding.default(%emb_weight, %input_0)
# CHECK-NOT: aten.linear
# CHECK: chunked_linear_cross_entropy(%embedding, %head_weight, %head_bias, %{{.*}}, 2, 3, 0.0, None, 5)
# CHECK-NOT: cross_entropy_loss
# CHECK: // stats: chunked-ce.rewritten=1


@run
def test_class_weights_are_left_alone():
    show(step(weight=torch.rand(64)), (X, Y), "chunked-ce", "symbolic_trace")
# CHECK-LABEL: TEST: test_class_weights_are_left_alone
# CHECK: call_module head
# CHECK: // stats: chunked-ce.skipped=1
# CHECK-NEXT: // info: [chunked-ce] at cross_entropy: cross-entropy with class weights or a legacy reduction: left alone
