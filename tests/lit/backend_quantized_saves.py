# RUN: %python %s | filecheck %s
# The torch.compile backend's partitioner with quantize="prefer": in the forward graph a
# saved activation goes through memfit.quantize_saved and its four parts are returned in
# its place; the backward graph takes the parts as placeholders and dequantizes right
# before the first use. Transposed (dense permuted) saves are permuted to their buffer's
# order first and back after dequantizing. Small saves and graph inputs stay as they are.
import warnings

import torch
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.decomposition import select_decomp_table

import memfit.compile as mb
from memfit.testing import run

warnings.filterwarnings("ignore")
torch.manual_seed(0)


def show(title):
    def compiler(gm, example_inputs):
        print(f"// {title}")
        for n in gm.graph.nodes:
            text = str(n.target)
            if n.op == "placeholder" and "_mfq_" in n.name:
                print(f"  placeholder %{n.name}")
            elif "memfit" in text or "_mf" in n.name:
                args = ", ".join(f"%{a.name}" if isinstance(a, torch.fx.Node) else repr(a) for a in n.args)
                print(f"  %{n.name} = {text}({args})")
            elif n.op == "output" and title == "forward":
                print("  return " + ", ".join(a.name for a in n.args[0] if isinstance(a, torch.fx.Node)))
        return gm.forward
    return compiler


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class Transposed(nn.Module):
    """mm's weight gradient needs sin(x).t(), a transposed view of sin's output, and it is
    saved as such (sin's own backward needs x, not its output)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(64, 16))

    def forward(self, x):
        return torch.sin(x) @ self.w


def compile_and_report(model, x):
    torch._dynamo.reset()
    opts = mb.BackendOptions(budget="50%", passes=(), codegen="eager", quantize="prefer", quantize_min_bytes=1024)
    part = mb.MemfitPartitioner(opts)
    backend = aot_autograd(fw_compiler=show("forward"), bw_compiler=show("backward"),
                           decompositions=select_decomp_table(), partition_fn=part)
    torch.compile(model, backend=backend)(x).sum().backward()
    (p,) = part.report.partitions
    print(f"// quantized {p.quantized} fits={p.fits} skipped={sorted(p.quantize_skipped.items())}")


@run
def tanh_save():
    compile_and_report(Net(), torch.randn(32, 64))
# CHECK-LABEL: TEST: tanh_save
# CHECK: // forward
# CHECK: %tanh_mfq = memfit.quantize_saved.default(%tanh, 8, 256)
# CHECK-NEXT: %tanh_mfq_codes = <built-in function getitem>(%tanh_mfq, 0)
# CHECK-NEXT: %tanh_mfq_flags = <built-in function getitem>(%tanh_mfq, 1)
# CHECK-NEXT: %tanh_mfq_scale = <built-in function getitem>(%tanh_mfq, 2)
# CHECK-NEXT: %tanh_mfq_zero = <built-in function getitem>(%tanh_mfq, 3)
# CHECK-NEXT: return addmm_1, primals_{{[0-9]}}, primals_{{[0-9]}}, tanh_mfq_codes, tanh_mfq_flags, tanh_mfq_scale, tanh_mfq_zero
# CHECK: // backward
# CHECK: placeholder %tanh_mfq_codes
# CHECK-NEXT: placeholder %tanh_mfq_flags
# CHECK-NEXT: placeholder %tanh_mfq_scale
# CHECK-NEXT: placeholder %tanh_mfq_zero
# CHECK: %tanh_mfdq = memfit.dequantize_saved.default(%tanh_mfq_codes, %tanh_mfq_flags, %tanh_mfq_scale, %tanh_mfq_zero, [32, 256], torch.float32, 8, 256)
# CHECK: // quantized ['tanh'] fits=True skipped=[('a graph input or a view of one', {{[0-9]+}})]

@run
def transposed_save():
    compile_and_report(Transposed(), torch.randn(32, 64))
# CHECK-LABEL: TEST: transposed_save
# CHECK: // forward
# CHECK: %permute_mfperm = aten.permute.default(%permute, [1, 0])
# CHECK-NEXT: %permute_mfq = memfit.quantize_saved.default(%permute_mfperm, 8, 256)
# CHECK: // backward
# CHECK: %permute_mfdq = memfit.dequantize_saved.default({{.*}}, [32, 64], torch.float32, 8, 256)
# CHECK-NEXT: %permute_mfunperm = aten.permute.default(%permute_mfdq, [1, 0])
# CHECK: // quantized ['permute'] fits=True
