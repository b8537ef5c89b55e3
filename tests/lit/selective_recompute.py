# RUN: %python %s | filecheck %s
"""FileCheck test of selective recompute: which regions keep their matmul outputs."""

import torch
from torch import nn

from memfit.cost_models.memory import analyze_step
from memfit.ir.capture import capture
from memfit.passes.checkpoint import apply_spans, call_nodes, module_runs, price_units
from memfit.planning.selective import selective_figures
from memfit.testing import run

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.ln(x))))


class Net(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x.relu_()          # an in-place update of a value no matmul produced


torch.manual_seed(0)
CAP = capture(Net(), (torch.randn(32, 16),))
analyze_step(CAP, loss_fn=lambda o: o.square().mean(), symbolic=False)
UNITS = price_units(CAP.gm, module_runs(call_nodes(CAP.gm), 2))     # blocks.0, blocks.1, (top)
SEL = selective_figures(CAP.gm, UNITS)


# CHECK-LABEL: TEST: figures
# CHECK: blocks.0 ok True kept 10240
# CHECK-NEXT: blocks.1 ok True kept 10240
# CHECK-NEXT: (top) ok False kept 0
@run
def figures():
    for u, ok, kept in zip(UNITS, SEL.ok, SEL.kept):
        print(u.label, "ok", ok, "kept", kept)


# CHECK-LABEL: TEST: one_selective_one_whole
# CHECK: memfit_ckpt_0 = {{.*}}memfit_selective_checkpoint_memfit_ckpt_0(x)
# CHECK-NEXT: getitem = memfit_ckpt_0[0]
# CHECK-NEXT: memfit_ckpt_1 = {{.*}}memfit_checkpoint_memfit_ckpt_1(getitem)
# CHECK: relu_ = {{.*}}.relu_()
# CHECK-NOT: memfit_selective
# CHECK: CheckpointedRegion(memfit_ckpt_0, selective)
# CHECK-NEXT: CheckpointedRegion(memfit_ckpt_1)
@run
def one_selective_one_whole():
    blocks = [k for k, u in enumerate(UNITS) if u.label.startswith("blocks")]
    spans = tuple((k, k + 1) for k in blocks)
    gm, made = apply_spans(CAP.gm, UNITS, spans, selective=spans[:1])
    print(gm.code)
    for n in made:
        print(repr(n.target))
