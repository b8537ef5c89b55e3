# RUN: %python %s | filecheck %s
# The guide's example pass (examples/custom_pass.py): every matching block becomes one call to
# a checkpointing wrapper around its outlined graph; other modules stay inline.
import importlib.util
import os

import torch

from memfit.testing import opt_text, run

spec = importlib.util.spec_from_file_location(
    "memfit_example_custom_pass", os.path.join(os.path.dirname(__file__), "..", "..", "examples", "custom_pass.py"))
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


@run
def test_checkpoint_two_of_three_blocks():
    model, (x,) = example.make(batch_size=2, seq=4, d=8, depth=3)
    print(opt_text(model, x, "checkpoint-blocks{pattern=re:blocks\\.[02]}", method="symbolic_trace", verify=True))
# CHECK-LABEL: TEST: test_checkpoint_two_of_three_blocks
# CHECK-NEXT: graph @Tower {
# CHECK-NEXT:   %x = placeholder : f32[2, 4, 8]
# CHECK-NEXT:   %[[B0:blocks_0]] = @blocks_0<Checkpointed>(%x) : f32[2, 4, 8] module=blocks.0
# CHECK-NEXT:   %blocks_1_ln = @blocks.1.ln(%[[B0]]) : f32[2, 4, 8] module=blocks.1.ln
# CHECK:        %[[B2:blocks_2]] = @blocks_2<Checkpointed>(%{{add[_0-9]*}}) : f32[2, 4, 8] module=blocks.2
# CHECK-NEXT:   %head = @head(%[[B2]]) : f32[2, 4, 10] module=head
# CHECK:      graph @blocks_0.region {
# CHECK-DAG:    %{{.*}} = @blocks_0_mlp_2(%{{.*}}) : f32[2, 4, 32] module=blocks.0.mlp.2
# CHECK-DAG:    %{{.*}} = @blocks_0_ln(%x) : f32[2, 4, 8] module=blocks.0.ln
# CHECK:      graph @blocks_2.region {
# CHECK-NOT:  graph @blocks_1
# CHECK:      // stats: checkpoint-blocks.checkpointed=2


@run
def test_export_graph_passes_parameters_in():
    model, (x,) = example.make(batch_size=2, seq=4, d=8, depth=1)
    print(opt_text(model, x, "checkpoint-blocks", method="export"))
# CHECK-LABEL: TEST: test_export_graph_passes_parameters_in
# CHECK: %blocks_0 = @blocks_0<Checkpointed>(%blocks_0_ln_weight, %blocks_0_ln_bias, %blocks_0_mlp_0_weight, %blocks_0_mlp_0_bias, %blocks_0_mlp_3_weight, %blocks_0_mlp_3_bias, %x) : f32[2, 4, 8] module=blocks.0
# CHECK: graph @blocks_0.region {
# CHECK: aten.dropout.default(%{{.*}}, 0.1, True) : f32[2, 4, 32] module=blocks.0.mlp.2
