"""PassManager verify mode: deliberately broken passes are caught, correct ones pass, and the
user's model (parameters, .grad, BatchNorm statistics) is left as it was."""

import copy
import operator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from memfit.ir.capture import capture
from memfit.errors import PassError
from memfit.passes import Pass, PassContext, PassManager, PassResult, Promise, VerificationError
from memfit.passes.infra.regions import module_regions, outline_region
from tests.models import MLP, ConvBN
from tests.test_regions import Tower


@dataclass(frozen=True)
class Identity(Pass):
    name: ClassVar[str] = "t-identity"

    def run(self, gm, ctx):
        return PassResult(gm, modified=False)


@dataclass(frozen=True)
class OutlineAll(Pass):
    """Outline every region matching `pattern` (exact)."""
    name: ClassVar[str] = "t-outline"
    pattern: str = "blocks.*"

    def run(self, gm, ctx):
        regions = module_regions(gm, self.pattern)
        for path, nodes in regions.items():
            outline_region(gm, nodes, path)
        return PassResult(gm, modified=bool(regions), stats={"outlined": len(regions)})


def _relu_nodes(gm):
    return [n for n in gm.graph.nodes if n.target in (torch.relu, torch.ops.aten.relu.default)
            or (n.op == "call_module" and isinstance(gm.get_submodule(n.target), torch.nn.ReLU))]


@dataclass(frozen=True)
class BrokenSigmoid(Pass):
    """Claims to be exact but replaces the first ReLU by a sigmoid."""
    name: ClassVar[str] = "t-broken-sigmoid"

    def run(self, gm, ctx):
        n = _relu_nodes(gm)[0]
        with gm.graph.inserting_after(n):
            s = gm.graph.call_function(torch.sigmoid, (n.args[0],))
        s.meta["val"] = n.meta["val"]
        n.replace_all_uses_with(s)
        gm.graph.erase_node(n)
        return PassResult(gm, modified=True, stats={"replaced": 1})


@dataclass(frozen=True)
class NoMeta(Pass):
    """Inserts an exact no-op node but forgets node.meta['val']."""
    name: ClassVar[str] = "t-no-meta"

    def run(self, gm, ctx):
        n = _relu_nodes(gm)[0]
        with gm.graph.inserting_after(n):
            c = gm.graph.call_function(torch.clone, (n,))
        n.replace_all_uses_with(c, delete_user_cb=lambda u: u is not c)
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class WrongMeta(Pass):
    """Inserts a node whose metadata has the wrong shape."""
    name: ClassVar[str] = "t-wrong-meta"

    def run(self, gm, ctx):
        n = _relu_nodes(gm)[0]
        with gm.graph.inserting_after(n):
            c = gm.graph.call_function(torch.clone, (n,))
        c.meta["val"] = n.meta["val"][:1]
        n.replace_all_uses_with(c, delete_user_cb=lambda u: u is not c)
        return PassResult(gm, modified=True)


@dataclass(frozen=True)
class MutatesWeights(Pass):
    """Scales a parameter in place (forbidden: it is the user's)."""
    name: ClassVar[str] = "t-mutates"

    def run(self, gm, ctx):
        with torch.no_grad():
            next(gm.parameters()).mul_(2.0)
        return PassResult(gm, modified=True)


def _scale_output(gm, factor):
    out = next(n for n in gm.graph.nodes if n.op == "output")
    first = out.args[0][0]
    with gm.graph.inserting_before(out):
        m = gm.graph.call_function(operator.mul, (first, factor))
    m.meta["val"] = first.meta["val"]
    out.args = ((m,) + tuple(out.args[0][1:]),)
    return PassResult(gm, modified=True)


@dataclass(frozen=True)
class Nudge(Pass):
    name: ClassVar[str] = "t-nudge"
    promise: ClassVar[Promise] = Promise("approximate", cosine=0.999)

    def run(self, gm, ctx):
        return _scale_output(gm, 1.001)  # cosine 1.0, relative error 1e-3


@dataclass(frozen=True)
class NudgeExact(Nudge):
    name: ClassVar[str] = "t-nudge-exact"
    promise: ClassVar[Promise] = Promise("exact", rtol=1e-5)


@dataclass(frozen=True)
class Negate(Pass):
    name: ClassVar[str] = "t-negate"
    promise: ClassVar[Promise] = Promise("changes_function")

    def run(self, gm, ctx):
        return _scale_output(gm, -1.0)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {k: (p.grad.clone() if p.grad is not None else None) for k, p in model.named_parameters()})


def _assert_same(model, snap):
    sd, grads = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    for k, p in model.named_parameters():
        if grads[k] is None:
            assert p.grad is None, k
        else:
            assert torch.equal(p.grad, grads[k]), k


def _convbn_with_grads():
    torch.manual_seed(0)
    m = ConvBN()
    x = torch.randn(2, 3, 8, 8)
    m(x).sum().backward()  # the user has .grad set and non-trivial BN statistics
    return m, x


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_broken_pass_is_caught_and_model_untouched(method):
    m, x = _convbn_with_grads()
    snap = _snapshot(m)
    cap = capture(m, (x,), method=method)
    pm = PassManager([Identity(), BrokenSigmoid()], verify=True)
    with pytest.raises(VerificationError) as ei:
        pm.run(cap.gm, PassContext(captured=cap))
    msg = str(ei.value)
    assert "t-broken-sigmoid" in msg
    assert "passes run before: t-identity" in msg
    assert "output 0 differs: relative error" in msg
    # the first old node whose value differs is the one reading the new sigmoid
    assert "first node that differs from the graph before the pass: %" in msg
    assert "args = (%sigmoid" in msg.split("first node")[1]
    assert isinstance(ei.value, PassError)
    _assert_same(m, snap)


def test_missing_and_wrong_metadata_are_caught():
    m = MLP()
    x = torch.randn(3, 64)
    for p, pattern in [(NoMeta(), "has no shape metadata"), (WrongMeta(), "metadata says shape")]:
        cap = capture(m, (x,))
        with pytest.raises(VerificationError, match=pattern) as ei:
            PassManager([p], verify=True).run(cap.gm, PassContext(captured=cap))
        assert "clone" in str(ei.value) and "passes run before: none" in str(ei.value)


def test_in_place_parameter_change_is_caught_and_restored():
    m, x = _convbn_with_grads()
    snap = _snapshot(m)
    cap = capture(m, (x,))
    with pytest.raises(VerificationError, match="changed stem.0.weight in place"):
        PassManager([MutatesWeights()], verify=True).run(cap.gm, PassContext(captured=cap))
    _assert_same(m, snap)


@pytest.mark.parametrize("method", ["symbolic_trace", "export"])
def test_exact_outlining_passes_verify_with_dropout_and_bn(method):
    torch.manual_seed(0)
    m = Tower(dropout=0.2)
    x = torch.randn(2, 5, 16)
    m(x).sum().backward()
    snap = _snapshot(m)
    cap = capture(m, (x,), method=method)
    res = PassManager([OutlineAll()], verify=True).run(cap.gm, PassContext(captured=cap))
    assert res.stats == {"t-outline.outlined": 3}
    _assert_same(m, snap)
    bn, xb = _convbn_with_grads()
    snap = _snapshot(bn)
    cap = capture(bn, (xb,), method=method)
    res = PassManager([OutlineAll(pattern="body")], verify=True).run(cap.gm, PassContext(captured=cap))
    assert res.stats == {"t-outline.outlined": 1}
    _assert_same(bn, snap)


def test_promise_kinds():
    m = MLP()
    x = torch.randn(3, 64)
    cap = capture(m, (x,))
    PassManager([Nudge()], verify=True).run(cap.gm, PassContext(captured=cap))  # approximate: ok
    cap = capture(m, (x,))
    with pytest.raises(VerificationError, match=r"relative error 1\.000e-03 > rtol 1e-05"):
        PassManager([NudgeExact()], verify=True).run(cap.gm, PassContext(captured=cap))
    cap = capture(m, (x,))
    PassManager([Negate()], verify=True).run(cap.gm, PassContext(captured=cap))  # not checked
    cap = capture(m, (x,))

    @dataclass(frozen=True)
    class NegateApprox(Negate):
        name: ClassVar[str] = "t-negate-approx"
        promise: ClassVar[Promise] = Promise("approximate", cosine=0.99)

    with pytest.raises(VerificationError, match="cosine similarity -1.000000 < 0.99"):
        PassManager([NegateApprox()], verify=True).run(cap.gm, PassContext(captured=cap))


def test_verify_without_inputs_is_a_clear_error():
    cap = capture(MLP(), (torch.randn(2, 64),))
    with pytest.raises(PassError, match="verify mode needs example inputs"):
        PassManager([Identity()], verify=True).run(cap.gm, PassContext())
    # explicit inputs work without a Captured
    PassManager([Identity()], verify=True).run(cap.gm, PassContext(inputs=[torch.randn(2, 64)]))


def test_non_tensor_nodes_need_no_metadata():
    # A get_attr of a module (as a pass calling a module functionally would add) computes no
    # tensor, so it needs no meta['val']; verify accepts it.
    @dataclass(frozen=True)
    class ModuleRef(Pass):
        name: ClassVar[str] = "t-module-ref"

        def run(self, gm, ctx):
            n = _relu_nodes(gm)[0]
            with gm.graph.inserting_before(n):
                ref = gm.graph.get_attr("fc1")
                gm.graph.call_function(id, (ref,))  # an int-valued node: no metadata either
            return PassResult(gm, modified=True)

    m = MLP()
    cap = capture(m, (torch.randn(3, 64),))
    PassManager([ModuleRef()], verify=True).run(cap.gm, PassContext(captured=cap))


def test_nodes_without_metadata_before_the_pass_are_not_blamed_on_it():
    cap = capture(MLP(), (torch.randn(4, 64),))
    victim = next(n for n in cap.gm.graph.nodes if n.op == "call_function" or n.op == "call_module")
    del victim.meta["val"]  # missing before any pass ran
    res = PassManager([Identity()], verify=True).run(cap.gm, PassContext(captured=cap))
    assert res.gm is cap.gm
