# RUN: %python %s | filecheck %s
# offload-activations: a scope node after the inputs, every node that saves an offloadable
# tensor becomes a memfit_offload.<node> call taking the scope first; tensors under min_bytes
# and parameters stay (diagnostics); on CPU the pass warns that nothing leaves the device.
import torch

from memfit.testing import run
from tests.lit.lit_helpers import show_wrapped
from tests.models import MLP, Block

torch.manual_seed(0)


def show(model, x, pipeline, method="auto"):
    show_wrapped(model, x, pipeline, "memfit_offload", method)


@run
def test_mlp():
    show(MLP(16, 64, 4), torch.randn(32, 16), "offload-activations{min_bytes=4096}")
# CHECK-LABEL: TEST: test_mlp
# CHECK-NEXT: %memfit_offload_scope = memfit_offload(%x)  # min_bytes=4096, prefetch=2
# CHECK-NEXT: %relu = memfit_offload.relu(%memfit_offload_scope, %fc1)  # call_function relu
# CHECK-NEXT: %fc2 = memfit_offload.fc2(%memfit_offload_scope, %relu)  # call_module fc2
# CHECK-NEXT: %gelu = memfit_offload.gelu(%memfit_offload_scope, %fc2)  # call_function gelu
# CHECK-NEXT: %fc3 = memfit_offload.fc3(%memfit_offload_scope, %gelu)  # call_module fc3
# CHECK-NEXT: // stats: offload-activations.bytes_saved=24576 offload-activations.extra_time_us={{[0-9]+}} offload-activations.nodes=4 offload-activations.tensors=3
# CHECK-NEXT: // info: [offload-activations] at fc1: 1 saved tensor(s) kept as is (tiny)
# CHECK-NEXT: // info: [offload-activations] at fc2: 1 saved tensor(s) kept as is (parameter_buffer_or_input)
# CHECK: // warning: [offload-activations]: on cpu the host copies are in the same memory: no device bytes are saved


@run
def test_block_export_every_size():
    show(Block(32, 4), torch.randn(2, 16, 32), "offload-activations{min_bytes=0,prefetch=1}", method="export")
# CHECK-LABEL: TEST: test_block_export_every_size
# CHECK-NEXT: %memfit_offload_scope = memfit_offload(%x)  # min_bytes=0, prefetch=1
# CHECK-DAG: %softmax = memfit_offload.softmax(%memfit_offload_scope, %mul, -1)  # call_function softmax.int
# CHECK-DAG: %gelu = memfit_offload.gelu(%memfit_offload_scope, %linear_2)  # call_function gelu.default
# CHECK-NOT: memfit_offload.transpose
# CHECK: // stats: offload-activations.bytes_saved={{[1-9][0-9]*}} offload-activations.extra_time_us={{[0-9]+}} offload-activations.nodes={{[1-9][0-9]*}} offload-activations.tensors={{[1-9][0-9]*}}
