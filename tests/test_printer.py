"""printer.py: the stable text form of a graph."""

import torch

from memfit.ir.capture import capture
from memfit.cost_models.memory import analyze_step
from memfit.passes.infra.printer import format_graph, format_type
from memfit.passes.infra.regions import module_regions, outline_region
from tests.models import MLP
from tests.test_regions import Tower


def test_format_type():
    assert format_type(torch.empty(8, 64)) == "f32[8, 64]"
    assert format_type((torch.empty(2, dtype=torch.int64), torch.empty((), dtype=torch.bfloat16))) == "(i64[2], bf16[])"
    assert format_type(3) == "int" and format_type(None) == "none"


def test_symbolic_trace_lines_with_saved_bytes():
    cap = capture(MLP(16, 32, 4), (torch.randn(8, 16),), method="symbolic_trace")
    analyze_step(cap)
    text = format_graph(cap.gm, name="MLP")
    lines = text.splitlines()
    assert lines[0] == "graph @MLP {"
    assert "  %x = placeholder : f32[8, 16]" in lines
    # fc2's input (relu output, 8x32 fp32 = 1 KiB) is what autograd saves at relu
    relu = next(line for line in lines if line.startswith("  %relu"))
    assert relu == "  %relu = torch.relu(%fc1) : f32[8, 32] saved=1.00 KiB"
    assert "  %fc3 = @fc3(%gelu) : f32[8, 4] module=fc3" in lines
    assert lines[-2] == "  return (%fc3,)"
    assert lines[-1].startswith("}  // saved=")
    # deterministic: a second capture prints the same text
    cap2 = capture(MLP(16, 32, 4), (torch.randn(8, 16),), method="symbolic_trace")
    analyze_step(cap2)
    assert format_graph(cap2.gm, name="MLP") == text


def test_export_and_outlined_children():
    cap = capture(Tower(n=2), (torch.randn(2, 5, 16),), method="export")
    for path, nodes in module_regions(cap.gm, "blocks.*").items():
        outline_region(cap.gm, nodes, path)
    text = format_graph(cap.gm, name="Tower", saved=False)
    assert "%linear_8 = aten.linear.default(%blocks_1, %head_weight, %head_bias) : f32[s77, s27, 4] module=head" in text
    assert "%blocks_0 = @blocks_0(%blocks_0_ln1_weight" in text and "module=blocks.0" in text
    assert "\ngraph @blocks_0 {\n" in text and "\ngraph @blocks_1 {\n" in text
    assert "saved=" not in text
    # every line of the child is indented or a brace
    child = text.split("graph @blocks_0 {\n")[1].split("\n}")[0]
    assert all(line.startswith("  %") or line.startswith("  return") for line in child.splitlines())
