# RUN: %python %s | filecheck %s
# quantize-activations: a scope node after the inputs, every node that saves a float
# activation becomes a memfit_quant.<node> call taking the scope first; attention nodes carry
# their head count; skipped saves are diagnostics.
import torch

from memfit.testing import run
from tests.lit.lit_helpers import show_wrapped
from tests.models import MLP, Block

torch.manual_seed(0)


def show(model, x, pipeline, method="auto"):
    show_wrapped(model, x, pipeline, "memfit_quant", method)


@run
def test_mlp():
    show(MLP(16, 64, 4), torch.randn(32, 16), "quantize-activations")
# CHECK-LABEL: TEST: test_mlp
# CHECK-NEXT: %memfit_quant_scope = memfit_quant(%x)  # bits=8, group_size=256, headwise=True, ema=False
# CHECK-NEXT: %relu = memfit_quant.relu(%memfit_quant_scope, %fc1)  # call_function relu
# CHECK-NEXT: %fc2 = memfit_quant.fc2(%memfit_quant_scope, %relu)  # call_module fc2
# CHECK-NEXT: %gelu = memfit_quant.gelu(%memfit_quant_scope, %fc2)  # call_function gelu
# CHECK-NEXT: %fc3 = memfit_quant.fc3(%memfit_quant_scope, %gelu)  # call_module fc3
# CHECK-NEXT: // stats: quantize-activations.bytes_saved={{[1-9][0-9]*}} quantize-activations.extra_time_us={{[0-9]+}} quantize-activations.headwise_tensors=0 quantize-activations.nodes=4 quantize-activations.tensors=3
# CHECK-NEXT: // info: [quantize-activations] at fc1: 1 saved tensor(s) kept as is (tiny)
# CHECK-NEXT: // info: [quantize-activations] at fc2: 1 saved tensor(s) kept as is (parameter_buffer_or_input)


@run
def test_block_export_headwise():
    show(Block(32, 4), torch.randn(2, 16, 32), "quantize-activations{bits=4,min_bytes=0}", method="export")
# CHECK-LABEL: TEST: test_block_export_headwise
# CHECK-NEXT: %memfit_quant_scope = memfit_quant(%x)  # bits=4
# CHECK-DAG: %matmul = memfit_quant.matmul(%memfit_quant_scope, %transpose, %transpose_3)  # call_function matmul.default, heads=4
# CHECK-DAG: %softmax = memfit_quant.softmax(%memfit_quant_scope, %mul, -1)  # call_function softmax.int, heads=4
# CHECK-DAG: %matmul_1 = memfit_quant.matmul_1(%memfit_quant_scope, %dropout, %transpose_2)  # call_function matmul.default, heads=4
# CHECK-DAG: %gelu = memfit_quant.gelu(%memfit_quant_scope, %linear_2)  # call_function gelu.default
# CHECK-NOT: memfit_quant.transpose
# CHECK: // stats: quantize-activations.bytes_saved={{[1-9][0-9]*}} quantize-activations.extra_time_us={{[0-9]+}} quantize-activations.headwise_tensors=4 quantize-activations.nodes=10 quantize-activations.tensors=14
# CHECK: // info: [quantize-activations] at layer_norm: 3 saved tensor(s) kept as is (parameter_buffer_or_input)


@run
def test_restricted_to_missing_node():
    show(MLP(16, 64, 4), torch.randn(32, 16), "quantize-activations{nodes=nope}")
# CHECK-LABEL: TEST: test_restricted_to_missing_node
# CHECK-NEXT: // stats: quantize-activations.headwise_tensors=0 quantize-activations.nodes=0 quantize-activations.tensors=0
# CHECK-NEXT: // warning: [quantize-activations]: no node named 'nope'
