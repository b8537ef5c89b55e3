# RUN: %python %s | filecheck %s
"""FileCheck test of nested (two-level) recompute: a region whose units are regions."""

import torch
from torch import nn

from memfit.cost_models.memory import analyze_step
from memfit.ir.capture import capture
from memfit.passes.checkpoint import apply_spans, call_nodes, module_runs, price_units
from memfit.testing import run

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


torch.manual_seed(0)
CAP = capture(Net(), (torch.randn(32, 16),))
analyze_step(CAP, loss_fn=lambda o: o.square().mean(), symbolic=False)
UNITS = price_units(CAP.gm, module_runs(call_nodes(CAP.gm), 2))     # blocks.0, (top), blocks.1, ...


# CHECK-LABEL: TEST: nested_span
# CHECK: units blocks.0 (top) blocks.1 (top) blocks.2 (top)
# CHECK: def forward(self, x):
# CHECK-NEXT: memfit_ckpt_0 = {{.*}}memfit_checkpoint_memfit_ckpt_0(x)
# CHECK-NEXT: [[OUT:getitem[_0-9]*]] = memfit_ckpt_0[0]
# CHECK-NEXT: return ([[OUT]],)
# CHECK: outer CheckpointedRegion(memfit_ckpt_0)
# CHECK: memfit_ckpt_0_0 = {{.*}}memfit_checkpoint_memfit_ckpt_0_0(x)
# CHECK: memfit_ckpt_0_1 = {{.*}}memfit_checkpoint_memfit_ckpt_0_1(x, getitem)
# CHECK: memfit_ckpt_0_5 = {{.*}}memfit_checkpoint_memfit_ckpt_0_5(
# CHECK-NOT: memfit_ckpt_0_6
# CHECK: inner memfit_ckpt_0_0 calls no region
@run
def nested_span():
    print("units", *[u.label for u in UNITS])
    span = ((0, len(UNITS)),)
    gm, (outer,) = apply_spans(CAP.gm, UNITS, span, nested=span)
    print(gm.code)
    region = outer.target
    print("outer", repr(region))
    print(region.gm.code)
    first = next(n.target for n in region.gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "gm"))
    calls = [n for n in first.gm.graph.nodes if hasattr(n.target, "gm")]
    print("inner", first.name, "calls no region" if not calls else "calls regions")
