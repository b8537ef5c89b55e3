# RUN: %python %s | filecheck %s
# A toy pass (relu -> clamp_min(x, 0.0)) on both capture roads, and the built-in outline pass.
from dataclasses import dataclass
from typing import ClassVar

import torch

from memfit.passes import Diagnostic, Pass, PassResult, register_pass
from memfit.testing import opt_text, run
from tests.models import MLP, Block


@register_pass
@dataclass(frozen=True)
class ReluToClamp(Pass):
    """Replace relu by clamp_min(x, 0.0) (exact)."""
    name: ClassVar[str] = "lit-relu-to-clamp"

    def run(self, gm, ctx):
        relus = {torch.relu: torch.clamp_min, torch.ops.aten.relu.default: torch.ops.aten.clamp_min.default}
        count, diags = 0, []
        for n in list(gm.graph.nodes):
            if n.op != "call_function" or n.target not in relus:
                if n.target in (torch.nn.functional.gelu, torch.ops.aten.gelu.default):
                    diags.append(Diagnostic(self.name, "gelu is not piecewise linear; left as is", node=n.name))
                continue
            with gm.graph.inserting_before(n):
                new = gm.graph.call_function(relus[n.target], (n.args[0], 0.0))
            new.meta = dict(n.meta)
            n.replace_all_uses_with(new)
            gm.graph.erase_node(n)
            count += 1
        return PassResult(gm, modified=count > 0, stats={"rewritten": count}, diagnostics=diags)


@run
def test_relu_to_clamp_symbolic_trace():
    print(opt_text(MLP(16, 32, 4), torch.randn(8, 16), "lit-relu-to-clamp", method="symbolic_trace",
                   verify=True))
# CHECK-LABEL: TEST: test_relu_to_clamp_symbolic_trace
# CHECK-NEXT: graph @MLP {
# CHECK-NEXT:   %x = placeholder : f32[8, 16]
# CHECK-NEXT:   %fc1 = @fc1(%x) : f32[8, 32] module=fc1
# CHECK-NEXT:   %[[C:[a-z_0-9]+]] = torch.clamp_min(%fc1, 0.0) : f32[8, 32]
# CHECK-NEXT:   %fc2 = @fc2(%[[C]]) : f32[8, 32] module=fc2
# CHECK-NOT: torch.relu
# CHECK: // stats: lit-relu-to-clamp.rewritten=1


@run
def test_relu_to_clamp_export_with_saved_bytes():
    print(opt_text(MLP(16, 32, 4), torch.randn(8, 16), "lit-relu-to-clamp", method="export",
                   analysis=True))
# CHECK-LABEL: TEST: test_relu_to_clamp_export_with_saved_bytes
# CHECK-DAG:   %fc1_weight = get_attr fc1.weight : f32[32, 16]
# CHECK-DAG:   %fc2_bias = get_attr fc2.bias : f32[32]
# CHECK-DAG:   %x = placeholder : f32[8, 16]
# CHECK:   %linear = aten.linear.default(%x, %fc1_weight, %fc1_bias) : f32[8, 32] {{.*}}module=fc1
# 8 x 32 fp32 = 1 KiB kept for clamp_min's backward (its mask) and fc2's input
# CHECK-NEXT:   %[[C:[a-z_0-9]+]] = aten.clamp_min.default(%linear, 0.0) : f32[8, 32] saved=1.00 KiB
# CHECK-NEXT:   %linear_1 = aten.linear.default(%[[C]], %fc2_weight, %fc2_bias) : f32[8, 32] saved=1.00 KiB module=fc2
# CHECK: // stats: lit-relu-to-clamp.rewritten=1


@run
def test_skipped_candidates_are_diagnostics():
    print(opt_text(MLP(16, 32, 4), torch.randn(8, 16), "lit-relu-to-clamp{}", method="symbolic_trace"))
# CHECK-LABEL: TEST: test_skipped_candidates_are_diagnostics
# CHECK: // stats: lit-relu-to-clamp.rewritten=1
# CHECK-NEXT: // info: [lit-relu-to-clamp] at gelu: gelu is not piecewise linear; left as is
# CHECK-EMPTY:


@run
def test_outline_block_parts():
    print(opt_text(Block(16, 2), torch.randn(2, 5, 16), "outline{pattern=mlp}", method="export"))
# CHECK-LABEL: TEST: test_outline_block_parts
# CHECK: %[[LN:layer_norm_1]] = aten.layer_norm.default(%add,
# CHECK-NEXT: %[[R:mlp_region]] = @mlp_region(%mlp_0_weight, %mlp_0_bias, %mlp_2_weight, %mlp_2_bias, %[[LN]]) : f32[2, 5, 16] module=mlp
# CHECK-NEXT: %add_1 = aten.add.Tensor(%add, %[[R]]) : f32[2, 5, 16]
# CHECK-NEXT: return (%add_1,)
# CHECK: graph @mlp_region {
# CHECK-DAG:   %mlp_2_bias = placeholder : f32[16]
# CHECK-DAG:   %mlp_0_weight = placeholder : f32[64, 16]
# CHECK-DAG:   %[[LN]] = placeholder : f32[2, 5, 16]
# CHECK:   %[[H:[a-z_0-9]+]] = aten.linear.default(%[[LN]], %mlp_0_weight, %mlp_0_bias) : f32[2, 5, 64] module=mlp.0
# CHECK-NEXT:   %gelu = aten.gelu.default(%[[H]]) : f32[2, 5, 64] module=mlp.1
# CHECK:   return %
# CHECK: // stats: outline.outlined=1
