"""regions.py: module_regions grouping and outline_region on both capture roads."""

import copy
import re

import pytest
import torch
from torch import nn

from memfit.ir.capture import capture
from memfit.errors import PassError
from memfit.passes.infra.regions import REGION_META, borrowed_modules, module_regions, outline_region
from tests.models import Block, ConvBN


class Tower(nn.Module):
    """Embedding-free transformer stack: (B, T, D) -> (B, T, 4)."""

    def __init__(self, d=16, n=3, dropout=0.0):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, 2, dropout) for _ in range(n)])
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _grads(model, out):
    model.zero_grad(set_to_none=True)
    sum(o.float().square().mean() for o in out if o.is_floating_point()).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _run(gm, x):
    out = gm(x)
    return out if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_module_regions_groups_blocks(method):
    m = Tower()
    cap = capture(m, (torch.randn(2, 5, 16),), method=method)
    regions = module_regions(cap.gm, "blocks.*")
    assert list(regions) == ["blocks.0", "blocks.1", "blocks.2"]
    for nodes in regions.values():
        assert all(n.op in ("call_function", "call_method", "call_module") for n in nodes)
    # The head is not in any region; a regex selects one block only.
    assert not any("head" in str(n.target) for ns in regions.values() for n in ns)
    assert list(module_regions(cap.gm, re.compile(r"blocks\.1"))) == ["blocks.1"]
    assert list(module_regions(cap.gm, r"re:blocks\.[02]")) == ["blocks.0", "blocks.2"]
    assert module_regions(cap.gm, "nothing.*") == {}
    # Inner modules: the shortest matching prefix wins, so "*.mlp" gives one region per block.
    assert list(module_regions(cap.gm, "*.mlp")) == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_outline_keeps_outputs_gradients_and_state_dict(method):
    torch.manual_seed(0)
    m = Tower()
    x = torch.randn(2, 5, 16)
    ref_out = m(x)
    ref_grads = _grads(m, (ref_out,))
    cap = capture(m, (x,), method=method)
    gm = cap.gm
    keys_before = list(gm.state_dict().keys())
    n_params_before = len(list(gm.parameters()))
    calls = []
    for path, nodes in module_regions(gm, "blocks.*").items():
        calls.append(outline_region(gm, nodes, path))
    assert [c.target for c in calls] == ["blocks_0", "blocks_1", "blocks_2"]
    assert all(c.meta[REGION_META]["nodes"] > 5 for c in calls)
    # Each call node has shape metadata; it equals the block output shape.
    for c in calls:
        assert tuple(c.meta["val"].shape) == (2, 5, 16)
    # Parameters stay owned by the parent: same keys, same tensor objects, none duplicated.
    assert list(gm.state_dict().keys()) == keys_before
    assert len(list(gm.parameters())) == n_params_before
    for k, v in gm.state_dict().items():
        assert v.data_ptr() == m.state_dict()[k].data_ptr()
    assert list(gm.blocks_0.state_dict().keys()) == []
    if method == "symbolic_trace":
        assert "blocks_0_qkv" in borrowed_modules(gm.blocks_0)
    else:
        # export: parameters enter the region as arguments of the call
        assert any(a.op == "get_attr" for a in calls[0].args)
    out = _run(gm, x)
    torch.testing.assert_close(out[0], ref_out, rtol=0, atol=0)
    grads = _grads(m, out)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-6, atol=0)


def test_outline_multi_output_and_interleaved_users():
    # Region {a, c} with an outside node b between them reading a: b must move after the call.
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.sin, (x,))
    b = g.call_function(torch.cos, (a,))
    c = g.call_function(torch.exp, (a,))
    d = g.call_function(torch.add, (b, c))
    g.output((d, a))
    gm = torch.fx.GraphModule(nn.Module(), g)
    xv = torch.randn(4)
    ref = gm(xv)
    call = outline_region(gm, [a, c], "r")
    assert isinstance(gm.get_submodule("r"), torch.fx.GraphModule)
    ops = [n.op for n in gm.graph.nodes]
    assert ops.count("call_module") == 1
    out = gm(xv)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    assert len(call.users) == 2  # two getitems


def test_outline_rejects_non_convex_and_bad_nodes():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.sin, (x,))
    b = g.call_function(torch.cos, (a,))
    c = g.call_function(torch.exp, (b,))
    g.output((c,))
    gm = torch.fx.GraphModule(nn.Module(), g)
    with pytest.raises(PassError, match="not convex"):
        outline_region(gm, [a, c], "r")
    with pytest.raises(PassError, match="placeholder"):
        outline_region(gm, [x, a], "r")
    with pytest.raises(PassError, match="no nodes"):
        outline_region(gm, [], "r")


def test_outline_convbn_keeps_buffers_and_training_stats():
    torch.manual_seed(0)
    m = ConvBN()
    ref = copy.deepcopy(m)
    x = torch.randn(2, 3, 8, 8)
    cap = capture(m, (x,), method="export")
    for path, nodes in module_regions(cap.gm, "body").items():
        outline_region(cap.gm, nodes, path)
    assert set(cap.gm.state_dict().keys()) == set(ref.state_dict().keys())
    out = _run(cap.gm, x)[0]
    torch.testing.assert_close(out, ref(x), rtol=1e-6, atol=1e-6)
    # Running statistics of the BN inside the region were updated like eager's.
    torch.testing.assert_close(m.body[1].running_mean, ref.body[1].running_mean)
