# RUN: %python %s | filecheck %s
"""FileCheck tests of the reversible pass: which blocks become one ReversibleStack call,
what the stack runs, and the diagnostics of skipped blocks."""

import torch
from torch import nn

from memfit.passes.infra.printer import format_graph
from memfit.passes.reversible import make_reversible, stacks
from memfit.testing import run
from tests.models import BlockStack as Stack, ConvNet

torch.manual_seed(0)



def show(rev):
    res = rev.pass_result
    print("stats:", " ".join(f"{k}={v}" for k, v in sorted(res.stats.items())))
    for d in res.diagnostics:
        print("diag:", d)
    print(format_graph(rev.graph_module, name="main", saved=False, children=False))
    for s in stacks(rev):
        print("stack:", s.extra_repr(), "names:", ",".join(s.names))


# CHECK-LABEL: TEST: transformer_pairs
# CHECK: stats: blocks_converted=4 blocks_skipped=0 couplings=2 stacks=1
# CHECK-NOT: diag:
# CHECK: graph @main {
# CHECK-NEXT: %x = placeholder
# CHECK-NOT: module=blocks.
# CHECK: %reversible_0 = @reversible_0(%x) : f32[2, 5, 16]
# CHECK-NEXT: %head = @head(%reversible_0)
# CHECK: stack: mode=pairs, blocks=4, couplings=2, lam=1, beta=1, anchor_every=0 names: blocks.0,blocks.1,blocks.2,blocks.3
@run
def transformer_pairs():
    show(make_reversible(Stack(), (torch.randn(2, 5, 16),)))


# CHECK-LABEL: TEST: transformer_meft_anchors
# CHECK: stats: blocks_converted=4 blocks_skipped=0 couplings=4 stacks=1
# CHECK: %reversible_0 = @reversible_0(%x)
# CHECK: stack: mode=meft, blocks=4, couplings=4, lam=0.05, beta=1, anchor_every=2, aux=delta
@run
def transformer_meft_anchors():
    show(make_reversible(Stack(), (torch.randn(2, 5, 16),), mode="meft", lam=0.05, anchor_every=2, aux="delta"))


# Two stacks around a downsampling block, which is skipped with a reason.
# CHECK-LABEL: TEST: conv_two_stacks
# CHECK: stats: blocks_converted=5 blocks_skipped=1 couplings=3 stacks=2
# CHECK: diag: info: [reversible] at layers.2: skipped block layers.2: block changes the shape
# CHECK: %reversible_0 = @reversible_0(%stem) : f32[2, 4, 8, 8]
# CHECK: @layers.2.conv(%reversible_0)
# CHECK: %reversible_1 = @reversible_1(%relu{{.*}}) : f32[2, 8, 4, 4]
# CHECK-DAG: stack: mode=pairs, blocks=2, couplings=1, {{.*}} names: layers.0,layers.1
# CHECK-DAG: stack: mode=pairs, blocks=3, couplings=2, {{.*}} names: layers.3,layers.4,layers.5
@run
def conv_two_stacks():
    show(make_reversible(ConvNet().eval(), (torch.randn(2, 3, 8, 8),), blocks="layers.*"))


# Negative: BatchNorm in train mode would update its statistics twice; nothing is converted.
# CHECK-LABEL: TEST: conv_train_bn
# CHECK: stats: blocks_converted=0 blocks_skipped=6 couplings=0 stacks=0
# CHECK: diag: info: [reversible] at layers.0: skipped block layers.0: stateful BatchNorm layers.0.bn in train mode
# CHECK-NOT: @reversible
# CHECK-LABEL: TEST: end
@run
def conv_train_bn():
    show(make_reversible(ConvNet().train(), (torch.randn(2, 3, 8, 8),), blocks="layers.*"))


@run
def end():
    pass
