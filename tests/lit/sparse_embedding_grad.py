# RUN: %python %s | filecheck %s
# sparse-embedding-grad on both capture roads: a lookup of a tied embedding becomes
# embedding_sparse_grad (padding index kept); an untied lookup stays, with the reason.
import torch
from torch import nn

from memfit.testing import run, show_calls as show

torch.manual_seed(0)


class LM(nn.Module):
    def __init__(self, vocab=64, d=8, tied=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=1)
        self.pos = nn.Embedding(16, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x) + self.pos(torch.arange(x.shape[1])))


X = torch.randint(0, 64, (2, 8))


@run
def test_symbolic_trace_road():
    show(LM(), (X,), "sparse-embedding-grad", "symbolic_trace")
# CHECK-LABEL: TEST: test_symbolic_trace_road
# CHECK: %embedding_sparse_grad = call_function memfit.runtime.embedding.embedding_sparse_grad(%x, %emb_weight, 1)
# CHECK-NOT: call_module emb(
# CHECK: %pos = call_module pos(%arange)
# CHECK: %head = call_module head(%add)
# CHECK: // stats: sparse-embedding-grad.rewritten=1 sparse-embedding-grad.skipped=1
# CHECK: at pos: embedding lookup left alone: its weight is not tied to another use


@run
def test_export_road():
    show(LM(), (X,), "sparse-embedding-grad", "export")
# CHECK-LABEL: TEST: test_export_road
# CHECK: %embedding_sparse_grad = call_function memfit.runtime.embedding.embedding_sparse_grad(%x, %head_weight, 1)
# CHECK: %embedding_1 = call_function aten.embedding.default(%pos_weight, %arange)
# CHECK: %linear = call_function aten.linear.default(%add, %head_weight)
# CHECK: // stats: sparse-embedding-grad.rewritten=1 sparse-embedding-grad.skipped=1


@run
def test_untied():
    show(LM(tied=False), (X,), "sparse-embedding-grad", "export")
# CHECK-LABEL: TEST: test_untied
# CHECK-NOT: embedding_sparse_grad
# CHECK: %embedding = call_function aten.embedding.default(%emb_weight, %x, 1)
# CHECK: // stats: sparse-embedding-grad.skipped=2
