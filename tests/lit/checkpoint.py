# RUN: %python %s | filecheck %s
"""FileCheck test of the checkpoint pass: outlined regions and their calls."""

import torch
from torch import nn

from memfit.ir.capture import capture
from memfit.errors import BudgetError
from memfit.passes.checkpoint import plan_checkpoint
from memfit.testing import run

torch.set_num_threads(1)


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(3))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


torch.manual_seed(0)
CAP = capture(Net(), (torch.randn(64, 16),))


# CHECK-LABEL: TEST: forced_regions
# CHECK: memfit_ckpt_0 = {{.*}}memfit_checkpoint_memfit_ckpt_0(x)
# CHECK-NEXT: getitem = memfit_ckpt_0[0]
# CHECK: add = x + getitem
# CHECK: memfit_ckpt_1 = {{.*}}memfit_checkpoint_memfit_ckpt_1(add)
# CHECK: memfit_ckpt_2 = {{.*}}memfit_checkpoint_memfit_ckpt_2(
# CHECK-NOT: memfit_ckpt_3
# CHECK: decision blocks.0 recompute
# CHECK: decision blocks.1 recompute
# CHECK: decision blocks.2 recompute
@run
def forced_regions():
    p = plan_checkpoint(CAP, None, regions="blocks.?")
    print(p.gm.code)
    for d in p.decisions:
        print("decision", d.target, d.action)


# CHECK-LABEL: TEST: region_body
# CHECK: def forward(self, x):
# CHECK-NEXT: blocks_0_0 = {{.*}}(x)
# CHECK-NEXT: blocks_0_1 = {{.*}}(blocks_0_0)
# CHECK-NEXT: blocks_0_2 = {{.*}}(blocks_0_1)
# CHECK-NEXT: return (blocks_0_2,)
@run
def region_body():
    p = plan_checkpoint(CAP, None, regions="blocks.0")
    call = next(n for n in p.gm.graph.nodes if n.meta.get("memfit_checkpoint"))
    print(call.target.gm.code)


# CHECK-LABEL: TEST: no_budget_pressure
# CHECK: regions 0
# CHECK-NOT: memfit_ckpt
@run
def no_budget_pressure():
    p = plan_checkpoint(CAP, "200%")
    print("regions", len(p.spans))
    print(p.gm.code)


# CHECK-LABEL: TEST: budget_75
# CHECK: regions [[N:[1-9]]]
# CHECK: memfit_checkpoint_memfit_ckpt_0(
# CHECK: fits True
@run
def budget_75():
    p = plan_checkpoint(CAP, "75%")
    print("regions", len(p.spans))
    print(p.gm.code)
    print("fits", p.peak_bytes <= p.budget_bytes)


# CHECK-LABEL: TEST: impossible_budget
# CHECK: BudgetError: checkpointing cannot meet the budget 1.00 KiB: the lowest predicted peak
# CHECK-SAME: quantized saved activations
@run
def impossible_budget():
    try:
        plan_checkpoint(CAP, "1KiB")
    except BudgetError as e:
        print("BudgetError:", e)
