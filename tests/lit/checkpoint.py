# RUN: %python %s | filecheck %s
"""FileCheck test of the checkpoint pass: outlined regions and their calls."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from memfit.ir.capture import capture  # noqa: E402
from memfit.errors import BudgetError  # noqa: E402
from memfit.passes.checkpoint import plan_checkpoint  # noqa: E402

torch.set_num_threads(1)


def case(fn):
    print(f"// CASE: {fn.__name__}")
    fn()
    return fn


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


# CHECK-LABEL: // CASE: forced_regions
# CHECK: memfit_ckpt_0 = {{.*}}memfit_checkpoint_memfit_ckpt_0(x)
# CHECK-NEXT: getitem = memfit_ckpt_0[0]
# CHECK: add = x + getitem
# CHECK: memfit_ckpt_1 = {{.*}}memfit_checkpoint_memfit_ckpt_1(add)
# CHECK: memfit_ckpt_2 = {{.*}}memfit_checkpoint_memfit_ckpt_2(
# CHECK-NOT: memfit_ckpt_3
# CHECK: decision blocks.0 recompute
# CHECK: decision blocks.1 recompute
# CHECK: decision blocks.2 recompute
@case
def forced_regions():
    p = plan_checkpoint(CAP, None, regions="blocks.?")
    print(p.gm.code)
    for d in p.decisions:
        print("decision", d.target, d.action)


# CHECK-LABEL: // CASE: region_body
# CHECK: def forward(self, x):
# CHECK-NEXT: blocks_0_0 = {{.*}}(x)
# CHECK-NEXT: blocks_0_1 = {{.*}}(blocks_0_0)
# CHECK-NEXT: blocks_0_2 = {{.*}}(blocks_0_1)
# CHECK-NEXT: return (blocks_0_2,)
@case
def region_body():
    p = plan_checkpoint(CAP, None, regions="blocks.0")
    call = next(n for n in p.gm.graph.nodes if n.meta.get("memfit_checkpoint"))
    print(call.target.gm.code)


# CHECK-LABEL: // CASE: no_budget_pressure
# CHECK: regions 0
# CHECK-NOT: memfit_ckpt
@case
def no_budget_pressure():
    p = plan_checkpoint(CAP, "200%")
    print("regions", len(p.spans))
    print(p.gm.code)


# CHECK-LABEL: // CASE: budget_75
# CHECK: regions [[N:[1-9]]]
# CHECK: memfit_checkpoint_memfit_ckpt_0(
# CHECK: fits True
@case
def budget_75():
    p = plan_checkpoint(CAP, "75%")
    print("regions", len(p.spans))
    print(p.gm.code)
    print("fits", p.peak_bytes <= p.budget_bytes)


# CHECK-LABEL: // CASE: impossible_budget
# CHECK: BudgetError: checkpointing cannot meet the budget 1.00 KiB: the lowest predicted peak
# CHECK-SAME: quantized saved activations
@case
def impossible_budget():
    try:
        plan_checkpoint(CAP, "1KiB")
    except BudgetError as e:
        print("BudgetError:", e)
