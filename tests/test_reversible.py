"""Reversible couplings: the runtime (gradients through reconstruction, reconstruction error,
warning, anchors) and the pass on hand-written stacks (transformer and conv blocks)."""

import math
import warnings

import pytest
import torch
from torch import nn

from memfit.errors import PassError
from memfit.passes import PassManager, get_pass, parse_pipeline
from memfit.passes.reversible import Reversible, ReversibleStack, make_reversible, set_recompute, stacks
from memfit.runtime.reversible import Coupling, ReconstructionReport, ReconstructionWarning, reversible_stack
from tests.models import Block, ConvNet as _ConvNet


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def mlp(d, dropout=0.0, scale=1.0):
    m = nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Dropout(dropout), nn.Linear(2 * d, d))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def couplings(mods, lam=1.0, beta=1.0):
    return [Coupling(F=mods[2 * i], G=mods[2 * i + 1], name=f"b{i}", lam=lam, beta=beta,
                     params=tuple(mods[2 * i].parameters()) + tuple(mods[2 * i + 1].parameters()))
            for i in range(len(mods) // 2)]


def grads(mods, x, run):
    for m in mods:
        m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(123)
    y1, y2 = run(x)
    (y1.sin().sum() + (2 * y2).cos().sum()).backward()
    return [x.grad] + [p.grad for m in mods for p in m.parameters()]


# -- runtime -------------------------------------------------------------------------------

@pytest.mark.parametrize("swap,lam,beta,dropout,shape", [
    (False, 1.0, 1.0, 0.0, (4, 16)),
    (False, 1.0, 1.0, 0.3, (3, 5, 16)),     # dropout masks replayed on recomputation
    (True, 0.5, 1.0, 0.0, (4, 16)),         # MEFT order and scaling
    (True, 0.7, 0.8, 0.2, (2, 7, 16)),
])
def test_gradients_through_reconstruction_match_stored(swap, lam, beta, dropout, shape):
    mods = [mlp(16, dropout) for _ in range(8)]
    x = torch.randn(*shape)
    cs = couplings(mods, lam, beta)
    ref = grads(mods, x, lambda t: reversible_stack(t, t, cs, swap=swap, recompute=False))
    got = grads(mods, x, lambda t: reversible_stack(t, t, cs, swap=swap, recompute=True))
    assert len(ref) == 1 + 8 * 4
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-4


def test_without_rng_replay_dropout_gradients_are_wrong():
    # The control for the dropout cases above: recomputing with fresh masks gives other gradients.
    mods = [mlp(16, 0.3) for _ in range(4)]
    x = torch.randn(3, 5, 16)
    cs = couplings(mods)
    ref = grads(mods, x, lambda t: reversible_stack(t, t, cs, recompute=False))
    bad = grads(mods, x, lambda t: reversible_stack(t, t, cs, preserve_rng=False))
    assert max(rel(a, b) for a, b in zip(bad, ref)) > 1e-2


def test_gradients_with_shared_ext_tensor():
    # An extra input every coupling reads (a mask, a position embedding) gets the sum of grads.
    d = 8
    mods = [nn.Linear(d, d) for _ in range(4)]
    bias = torch.randn(d, requires_grad=True)

    def mk(m):
        return lambda x, b: torch.tanh(m(x) + b)

    cs = [Coupling(F=mk(mods[0]), G=mk(mods[1]), params=tuple(mods[0].parameters()) + tuple(mods[1].parameters()), ext=(0,)),
          Coupling(F=mk(mods[2]), G=mk(mods[3]), params=tuple(mods[2].parameters()) + tuple(mods[3].parameters()), ext=(0,))]
    x = torch.randn(3, d)
    out = []
    for rc in (False, True):
        bias.grad = None
        y1, y2 = reversible_stack(x, x, cs, [bias], recompute=rc)
        (y1 * y2).sum().backward()
        out.append(bias.grad.clone())
    assert rel(out[1], out[0]) < 1e-5
    assert out[0].abs().sum() > 0


def test_reconstruction_error_is_measured_per_block():
    mods = [mlp(16) for _ in range(8)]
    rep = ReconstructionReport()
    x = torch.randn(4, 16)
    y1, y2 = reversible_stack(x, x, couplings(mods), check=True, report=rep)
    (y1 + y2).sum().backward()
    assert sorted(rep.errors) == ["b0", "b1", "b2", "b3"]
    assert all(0 <= e < 1e-5 for e in rep.errors.values())
    assert rep.anchored == 4 and rep.reconstructed == 0
    # Without check mode and anchors nothing is stored, so nothing is measured.
    y1, y2 = reversible_stack(x, x, couplings(mods), report=rep)
    (y1 + y2).sum().backward()
    assert rep.errors == {} and rep.reconstructed == 4


def drifting(dtype):
    # Large weights and a small lam: each rebuilt input loses about log2(Lip/lam) bits.
    torch.manual_seed(0)
    mods = [mlp(32, scale=3.0).to(dtype) for _ in range(12)]
    x = torch.randn(8, 32, dtype=dtype)
    return mods, x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_drift_warning_names_the_block(dtype):
    mods, x = drifting(dtype)
    rep = ReconstructionReport()
    with pytest.warns(ReconstructionWarning, match=r"reversible block b\d"):
        y1, y2 = reversible_stack(x, x, couplings(mods, lam=0.25), swap=True, check=True, report=rep)
        (y1.float().sum() + y2.float().sum()).backward()
    worst = rep.worst()
    assert worst is not None and worst[1] > 1e-3
    # The error grows from the top of the stack (last coupling, rebuilt first) downwards.
    assert rep.errors["b0"] > rep.errors["b5"]


def test_no_warning_in_fp32_small_stack():
    mods = [mlp(16) for _ in range(8)]
    x = torch.randn(4, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReconstructionWarning)
        y1, y2 = reversible_stack(x, x, couplings(mods), check=True)
        (y1 + y2).sum().backward()


def test_anchor_every_k_stores_inputs_and_bounds_drift():
    mods, x = drifting(torch.bfloat16)
    cs = couplings(mods, lam=0.25)
    ref = grads(mods, x, lambda t: reversible_stack(t, t, cs, swap=True, recompute=False))
    errs = {}
    for k in (0, 2, 1):
        rep = ReconstructionReport()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ReconstructionWarning)
            got = grads(mods, x, lambda t: reversible_stack(t, t, cs, swap=True, anchor_every=k, report=rep))
        errs[k] = max(rel(a.float(), b.float()) for a, b in zip(got, ref))
        assert rep.anchored == (math.ceil(6 / k) if k else 0)
        assert rep.reconstructed == 6 - rep.anchored
        if k:
            assert set(rep.errors) == {f"b{j}" for j in range(0, 6, k)}
    # k=1 stores every input: the same gradients as stored activations (up to bf16 rounding of
    # the recomputation); k=2 restarts reconstruction every 2 couplings: far less drift than none.
    assert errs[1] < 2e-2
    assert errs[2] < errs[0] / 10


def test_anchors_cost_saved_bytes():
    mods = [mlp(16) for _ in range(8)]
    x = torch.randn(4, 16, requires_grad=True)
    saved = {}
    for k in (0, 1, 2):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y1, y2 = reversible_stack(x, x, couplings(mods), anchor_every=k)
        saved[k] = sum(seen.values())
        (y1 + y2).sum().backward()
    one = 4 * 16 * 4
    assert saved[0] == 2 * one                      # the final two streams
    assert saved[2] == saved[0] + 3 * one           # x at coupling 0 (both streams alias), 2x2 at 2
    assert saved[1] > saved[2]


def test_runtime_rejects_bad_input():
    with pytest.raises(ValueError, match="nonzero"):
        Coupling(F=None, G=None, lam=0.0)
    with pytest.raises(ValueError, match="same shape"):
        reversible_stack(torch.zeros(2, 3), torch.zeros(2, 4), [Coupling(F=None, G=None)])
    with pytest.raises(ValueError, match="at least one"):
        reversible_stack(torch.zeros(2), torch.zeros(2), [])


# -- the pass on hand-written stacks --------------------------------------------------------

class Stack(nn.Module):
    def __init__(self, n=4, d=16, dropout=0.0):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList([Block(d, 2, dropout=dropout) for _ in range(n)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def ConvNet(c=4):  # noqa: N802 - reads like the model class it builds
    return _ConvNet(c, before=4, after=3)


def grad_pair(rev, model, inputs, loss=lambda out: out.square().mean()):
    out = []
    for rc in (False, True):
        set_recompute(rev, rc)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss(rev(*inputs)).backward()
        out.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    set_recompute(rev, True)
    return out


@pytest.mark.parametrize("mode,couplings_", [("pairs", 2), ("meft", 4)])
def test_pass_on_transformer_stack(mode, couplings_):
    torch.manual_seed(0)
    m = Stack(4, dropout=0.1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 6, 16)
    rev = make_reversible(m, (x,), mode=mode)
    assert rev.pass_result.stats == {"stacks": 1, "blocks_converted": 4, "blocks_skipped": 0, "couplings": couplings_}
    assert rev.pass_result.diagnostics == []
    assert list(rev.state_dict()) == list(m.state_dict())
    assert all(rev.state_dict()[k].data_ptr() == v.data_ptr() for k, v in m.state_dict().items())
    ref, got = grad_pair(rev, m, (x,))
    assert len(ref) == len(list(m.parameters()))
    worst = max(rel(a, b) for a, b in zip(got, ref))
    assert worst < 1e-4
    # The function did change (it is a different architecture), and the user's model did not.
    out = rev(x)
    m.eval()
    assert not torch.allclose(out, m(x), atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert all(type(b) is Block for b in m.blocks)


def test_pass_on_conv_blocks_skips_shape_change_and_train_bn():
    torch.manual_seed(0)
    m = ConvNet().eval()  # BatchNorm frozen: recomputing it has no side effect
    x = torch.randn(2, 3, 8, 8)
    rev = make_reversible(m, (x,), blocks="layers.*")
    st = rev.pass_result.stats
    assert st == {"stacks": 2, "blocks_converted": 7, "blocks_skipped": 1, "couplings": 4}
    (d,) = rev.pass_result.diagnostics
    assert d.node == "layers.4" and "changes the shape" in d.message
    ref, got = grad_pair(rev, m, (x,))
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-4

    m.train()
    rev = make_reversible(m, (x,), blocks="layers.*")
    assert rev.pass_result.stats["blocks_converted"] == 0
    msgs = [d.message for d in rev.pass_result.diagnostics]
    assert sum("stateful BatchNorm" in s for s in msgs) == 7
    assert not rev.pass_result.modified


def test_auto_detect_and_pattern_agree():
    m = Stack(4)
    x = torch.randn(2, 5, 16)
    a = make_reversible(m, (x,))
    c = make_reversible(m, (x,), blocks="re:blocks\\.[0-2]")  # 3 blocks: one pair and a lone F
    assert [s.names for s in stacks(a)] == [["blocks.0", "blocks.1", "blocks.2", "blocks.3"]]
    assert c.pass_result.stats["blocks_converted"] == 3 and c.pass_result.stats["couplings"] == 2
    assert [s.names for s in stacks(c)] == [["blocks.0", "blocks.1", "blocks.2"]]


def test_no_blocks_gives_a_diagnostic():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    rev = make_reversible(m, (torch.randn(2, 4),))
    assert not rev.pass_result.modified
    assert rev.pass_result.stats["blocks_converted"] == 0
    assert "no repeated blocks" in rev.pass_result.diagnostics[0].message


def test_min_blocks_and_registry_text_form():
    p = parse_pipeline("reversible{mode=meft,lam=0.05,blocks=blocks.*,anchor_every=2}")[0]
    assert isinstance(p, Reversible) and p.mode == "meft" and p.lam == 0.05 and p.anchor_every == 2
    assert parse_pipeline(p.to_text())[0] == p
    assert get_pass("reversible") is Reversible
    assert Reversible.promise.kind == "changes_function"
    with pytest.raises(PassError, match="mode"):
        parse_pipeline("reversible{mode=sideways}")
    with pytest.raises(PassError, match="nonzero"):
        parse_pipeline("reversible{lam=0}")
    m = Stack(2)
    rev = make_reversible(m, (torch.randn(1, 3, 16),), min_blocks=3)
    assert rev.pass_result.stats["blocks_converted"] == 0 and "min_blocks=3" in rev.pass_result.diagnostics[0].message


def test_pass_through_pass_manager():
    from memfit.ir.capture import capture

    m = Stack(4)
    x = torch.randn(2, 5, 16)
    cap = capture(m, (x,))
    res = PassManager("reversible{mode=meft,anchor_every=2}").run(cap.gm)
    assert res.stats["reversible.blocks_converted"] == 4
    stacks = [s for s in res.gm.modules() if isinstance(s, ReversibleStack)]
    assert len(stacks) == 1 and stacks[0].anchor_every == 2
    out = res.gm(x)[0]
    out.sum().backward()
    assert stacks[0].report.anchored == 2
    assert all(e < 1e-4 for e in stacks[0].report.errors.values())


def test_a_plain_sequential_of_blocks_is_found():
    """The model itself the list of blocks (nn.Sequential(Block, Block, ...)): found without a
    pattern; a Sequential of single layers is not taken for blocks."""
    torch.manual_seed(0)
    m = nn.Sequential(*[Block(16, 2) for _ in range(4)])
    x = torch.randn(2, 5, 16)
    rev = make_reversible(m, (x,))
    assert rev.pass_result.stats == {"stacks": 1, "blocks_converted": 4, "blocks_skipped": 0, "couplings": 2}
    assert [s.names for s in stacks(rev)] == [["0", "1", "2", "3"]]
    ref, got = grad_pair(rev, m, (x,))
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-4
    layers = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU())
    assert not make_reversible(layers, (torch.randn(2, 4),)).pass_result.modified
