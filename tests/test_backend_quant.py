"""Quantized saved tensors in the torch.compile backend (memfit/compile/quantized_saves.py,
memfit/kernels/ops.py, MemfitPartitioner's quantize option)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memfit.compile as mb
import memfit.compile.quantized_saves as pq
import memfit.cost_models.roofline as roofline
from memfit.kernels import ops, reference
from tests.models import Block
from tests.test_backend import _grads, _rel

warnings.filterwarnings("ignore", category=FutureWarning)


def _min_cos(a, b):
    return min(F.cosine_similarity(x.flatten().double(), y.flatten().double(), 0).item() for x, y in zip(a, b))


class SavedBytes:
    """Bytes the compiled function saves for backward at run time (saved_tensors_hooks),
    by storage, without parameters and inputs: what PartitionReport.saved_bytes predicts."""

    def __init__(self, exclude):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen, self.nbytes = set(), 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.nbytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _run(model, x, seed=0, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=mb.make_backend(**options))
    out, g = _grads(model, lambda: compiled(x), seed)
    with SavedBytes([*model.parameters(), *model.buffers(), x]) as sb:
        compiled(x)   # forward only: the loss's own saves are not the graph's
    return out, g, mb.last_report(), sb.nbytes


@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(0)
    return nn.Sequential(Block(32, 4), Block(32, 4)), torch.randn(2, 16, 32)


@pytest.fixture(scope="module")
def reference_grads(blocks):
    model, x = blocks
    return _grads(model, lambda: model(x))


# --- the custom operators ---------------------------------------------------------------


def test_ops_match_reference_and_pass_opcheck():
    torch.manual_seed(0)
    x = torch.randn(5, 77) * 3
    x[1, 3] = float("nan")
    x[4, 0] = float("inf")
    for bits in (8, 4):
        parts = torch.ops.memfit.quantize_saved(x, bits, 64)
        ref = reference.quantize(x, bits, 64)
        for a, b in zip(parts, ref):
            assert torch.equal(a, b)
        y = torch.ops.memfit.dequantize_saved(*parts, list(x.shape), torch.float32, bits, 64)
        assert y.shape == x.shape and y.is_contiguous()
        assert torch.isnan(y[1, 3]) and y[4, 0] == float("inf")
        fin = torch.isfinite(x)
        row_range = (x[fin].max() - x[fin].min()).item()
        assert (y[fin] - x[fin]).abs().max() <= reference.error_bound(bits, row_range)
        assert sum(p.numel() * p.element_size() for p in parts) == ops.packed_nbytes(x.numel(), bits, 64)
    torch.library.opcheck(torch.ops.memfit.quantize_saved.default, (torch.randn(3, 40), 8, 32))
    parts = torch.ops.memfit.quantize_saved(torch.randn(3, 40, dtype=torch.bfloat16), 8, 32)
    torch.library.opcheck(torch.ops.memfit.dequantize_saved.default, (*parts, [3, 40], torch.bfloat16, 8, 32))


def test_fake_shapes_are_symbolic_friendly():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        x = mode.from_tensor(torch.randn(6, 100), symbolic_context=None)
        codes, flags, scale, zero = torch.ops.memfit.quantize_saved(x, 4, 64)
    assert tuple(codes.shape) == (10, 32) and codes.dtype == torch.uint8
    assert flags.shape == scale.shape == zero.shape == (10,)


# --- candidates ---------------------------------------------------------------------------


def test_dense_order():
    a = torch.empty(2, 3, 4)
    assert pq.dense_order(a) is None
    t = a.permute(2, 0, 1)
    perm = pq.dense_order(t)
    assert t.permute(perm).is_contiguous()
    assert pq.dense_order(a[:, :, :2]) is False          # gaps
    assert pq.dense_order(torch.empty(4, 1).expand(4, 5)) is False   # overlapping


def test_choose_takes_largest_until_covered():
    c = [pq.SaveCandidate("a", 4000, 1000, None), pq.SaveCandidate("b", 16000, 4000, None),
         pq.SaveCandidate("c", 8000, 2000, None), pq.SaveCandidate("d", 99999, 0, "dtype torch.int64")]
    assert pq.choose(c, None) == ["b", "c", "a"]
    assert pq.choose(c, 12000) == ["b"]
    assert pq.choose(c, 12001) == ["b", "c"]
    assert pq.choose(c, 0) == []


# --- the partitioner ------------------------------------------------------------------------


class NoisyMLP(nn.Module):
    """Gaussian noise injection (a regularizer): randn_like is an RNG op, pinned (saved),
    so its float output is a floor recompute cannot go under."""

    def __init__(self, d=64):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, 4 * d), nn.Linear(4 * d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h * (1 + 0.1 * torch.randn_like(h))
        h = torch.tanh(self.fc2(h))
        h = h * (1 + 0.1 * torch.randn_like(h))
        return self.fc3(h)


def test_quantize_meets_a_budget_recompute_alone_cannot():
    """The recompute floor F (pinned noise tensors, found with `quantize="never"`) is not
    met at 70% of F by recompute; "auto" then quantizes. Saved bytes at run time equal the
    report's; gradients against the exact recompute-only run with the same seed (same
    noise): cosine >= 0.99 per parameter, and not equal."""
    torch.manual_seed(0)
    model, x = NoisyMLP(), torch.randn(32, 64)
    _, g0, rep0, m0 = _run(model, x, seed=5, budget=1, codegen="eager", passes=(), quantize="never",
                           search_steps=2)
    (p0,) = rep0.partitions
    assert not p0.fits and not p0.quantized and m0 == p0.saved_bytes > 0
    budget = int(0.7 * p0.saved_bytes)
    _, g, rep, measured = _run(model, x, seed=5, budget=budget, codegen="eager", passes=(), quantize="auto")
    (p,) = rep.partitions
    assert p.fits and p.saved_bytes <= budget
    assert p.quantized and p.quantize_bits == 8
    assert p.quantized_packed_bytes < p.quantized_bytes / 3
    assert measured == p.saved_bytes
    assert _min_cos(g, g0) >= 0.99 and _rel(g, g0) > 1e-7
    assert "quantized" in str(p)


def test_prefer_quantizes_instead_of_recomputing(blocks, reference_grads):
    model, x = blocks
    _, ref = reference_grads
    _, g, rep, measured = _run(model, x, budget="50%", codegen="eager", passes=(), quantize="prefer")
    (p,) = rep.partitions
    assert p.fits and p.ratio is None          # the default partition, nothing more recomputed
    assert p.recomputed_nodes == p.baseline_recomputed_nodes
    assert p.quantized and measured == p.saved_bytes <= p.target_bytes
    # only as much as needed: dropping the smallest chosen tensor would not fit
    assert p.baseline_saved_bytes - (p.quantized_bytes - p.quantized_packed_bytes) == p.saved_bytes
    assert _min_cos(g, ref) >= 0.99
    # "never" at the same budget recomputes instead, exactly
    _, g2, rep2, _ = _run(model, x, budget="50%", codegen="eager", passes=(), quantize="never")
    assert not rep2.partitions[0].quantized and rep2.partitions[0].recomputed_nodes > p.recomputed_nodes
    assert _rel(g2, ref) < 1e-5


def test_auto_prefers_recompute_when_it_fits(blocks, reference_grads):
    model, x = blocks
    _, ref = reference_grads
    _, g, rep, _ = _run(model, x, budget="50%", codegen="eager", passes=())
    (p,) = rep.partitions
    assert p.fits and not p.quantized
    assert _rel(g, ref) < 1e-5


def test_four_bits_and_dropout_masks_replay():
    """Dropout masks are kept (bool, pinned): against the unbudgeted compile with the same
    seed (same masks) the 4-bit gradients stay close; two runs with the same seed give the
    same gradients."""
    torch.manual_seed(0)
    model, x = nn.Sequential(Block(32, 4, dropout=0.3), Block(32, 4, dropout=0.3)), torch.randn(2, 16, 32)
    _, ref, _, _ = _run(model, x, seed=3, codegen="eager", passes=())
    opts = dict(budget="30%", codegen="eager", passes=(), quantize="prefer", quantize_bits=4)
    _, g, rep, measured = _run(model, x, seed=3, **opts)
    (p,) = rep.partitions
    assert p.quantize_bits == 4 and p.quantized and measured == p.saved_bytes
    assert p.rng_pinned == 2
    assert _min_cos(g, ref) >= 0.95
    _, g_again, _, _ = _run(model, x, seed=3, **opts)
    assert _rel(g_again, g) == 0.0


def test_bf16_saved_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(Block(32, 4), Block(32, 4)).to(torch.bfloat16)
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    _, ref = _grads(model, lambda: model(x))
    _, g, rep, measured = _run(model, x, budget="60%", codegen="eager", passes=(), quantize="prefer",
                                   quantize_min_bytes=1024)
    (p,) = rep.partitions
    assert p.fits and p.quantized and measured == p.saved_bytes
    assert _min_cos(g, ref) >= 0.98


def test_options_validated():
    with pytest.raises(mb.BackendError, match="quantize must be one of"):
        mb.BackendOptions(quantize="always")
    with pytest.raises(mb.BackendError, match="bits must be one of"):
        mb.BackendOptions(quantize_bits=3)
    with pytest.raises(mb.BackendError, match="quantize_min_bytes"):
        mb.BackendOptions(quantize_min_bytes=-1)
    assert mb.BackendOptions(quantize="never").to_dict()["quantize"] == "never"


@pytest.mark.slow
def test_inductor_runs_quantized_saves(reference_grads, blocks):
    """Inductor compiles the custom operators as extern kernels (C++ wrapper on CPU)."""
    model, x = blocks
    _, ref = reference_grads
    _, g, rep, measured = _run(model, x, budget="40%", codegen="inductor", passes=(), quantize="prefer")
    (p,) = rep.partitions
    assert p.fits and p.quantized and measured == p.saved_bytes
    assert _min_cos(g, ref) >= 0.99


def test_cheapest_picks_the_lower_predicted_time(blocks, reference_grads):
    """quantize="cheapest" prices both plans (roofline) and keeps the cheaper; the report's
    predicted extra time is that plan's."""
    model, x = blocks
    _, ref = reference_grads
    _, g, rep, measured = _run(model, x, budget="20%", codegen="eager", passes=(), quantize="cheapest")
    (p,) = rep.partitions
    alt = p.alternatives_s
    assert set(alt) == {"recompute", "quantize"} and p.fits and measured == p.saved_bytes
    assert p.predicted_extra_s == pytest.approx(min(alt.values()))
    assert bool(p.quantized) == (alt["quantize"] < alt["recompute"])
    assert _min_cos(g, ref) >= 0.99


def test_roofline_node_time():
    """mm counts 2*m*n*k FLOPs (torch's flop formulas on the FakeTensor metadata); views are
    free; a pointwise op costs its bytes."""
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    g = fx.Graph()
    a, b = g.placeholder("a"), g.placeholder("b")
    mm = g.call_function(torch.ops.aten.mm.default, (a, b))
    v = g.call_function(torch.ops.aten.view.default, (mm, [-1]))
    r = g.call_function(torch.ops.aten.relu.default, (v,))
    with mode:
        av, bv = torch.empty(64, 32), torch.empty(32, 16)
        a.meta["val"], b.meta["val"] = av, bv
        mm.meta["val"] = av @ bv
        v.meta["val"] = mm.meta["val"].view(-1)
        r.meta["val"] = torch.relu(v.meta["val"])
    assert roofline.node_time_s(mm, 1.0, 1e30) == 2 * 64 * 32 * 16
    assert roofline.node_time_s(v, 1.0, 1.0) == 0.0
    assert roofline.node_time_s(r, 1e30, 1.0) == 2 * 64 * 16 * 4


def test_dynamic_shapes(blocks, reference_grads):
    """Under dynamic shapes saved sizes are symbolic (4*s0, s0*s1); backward rebuilds them
    from its SymInt inputs for dequantize. Two sequence lengths (Dynamo compiles twice here,
    with or without quantization); at the first, the bytes saved at run time equal the
    report's."""
    model, x = blocks
    _, ref = reference_grads
    torch._dynamo.reset()
    mb.clear_reports()
    compiled = torch.compile(model, dynamic=True, backend=mb.make_backend(
        "50%", codegen="eager", passes=(), quantize="prefer", quantize_min_bytes=1024))
    _, g = _grads(model, lambda: compiled(x))
    (p,) = mb.last_report().partitions
    assert p.fits and p.quantized
    assert _min_cos(g, ref) >= 0.99
    with SavedBytes([*model.parameters(), x]) as sb:
        compiled(x)
    assert sb.nbytes == p.saved_bytes
    x2 = torch.randn(2, 24, 32)
    _, ref2 = _grads(model, lambda: model(x2))
    _, g2 = _grads(model, lambda: compiled(x2))
    assert all(p.quantized for r in mb.reports() for p in r.partitions)
    assert _min_cos(g2, ref2) >= 0.99


def test_symbolic_size_not_in_backward_is_skipped():
    """A size backward cannot rebuild (here: a symbol it does not take as input) makes the
    tensor ineligible, with the reason."""
    import sympy
    s0, s1 = sympy.Symbol("s0"), sympy.Symbol("s1")
    assert pq._expressible(None, {s0: object()}, 4 * s0 + 2)
    assert not pq._expressible(None, {s0: object()}, s0 * s1)
    assert not pq._expressible(None, {s0: object()}, sympy.floor(s0 / 2))
    assert pq._expressible(7, {})


def test_triton_kernels_inside_the_compiled_graph(blocks):
    """The custom operators dispatch to the Triton kernels where they run (CUDA; here the
    interpreter, forced): same gradients, bit for bit, as with the torch reference."""
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU without TRITON_INTERPRET=1 (tools/run_tests.sh sets it)")
    from memfit.kernels import dispatch
    if dispatch._triton_module() is None:  # noqa: SLF001
        pytest.skip("Triton unavailable")
    model, x = blocks
    opts = dict(budget="50%", codegen="eager", passes=(), quantize="prefer")
    with dispatch.force_backend("reference"):
        _, g_ref, rep_ref, _ = _run(model, x, **opts)
    with dispatch.force_backend("triton"):
        _, g_tri, rep_tri, _ = _run(model, x, **opts)
    assert rep_ref.partitions[0].quantized == rep_tri.partitions[0].quantized != []
    for a, b in zip(g_tri, g_ref):
        assert torch.equal(a, b)
