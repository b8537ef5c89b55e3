"""Kernel-scratch probes: cache on disk, keys, agreement with the profiler, and predictions
that hold at 1 and at 2 threads."""

import importlib
import json
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

import memfit
from memfit.cost_models import probes

aten = torch.ops.aten
CONV_BWD = aten.convolution_backward.default


def _conv_bwd_args(b=4, cin=16, cout=32, hw=8, k=3):
    g, x, w = torch.zeros(b, cout, hw, hw), torch.zeros(b, cin, hw, hw), torch.zeros(cout, cin, k, k)
    return (g, x, w, [0], [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [True, True, False])


def _fake(args):
    fm = FakeTensorMode()
    return fm, tuple(fm.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)


def _probe(args, kwargs=None, func=CONV_BWD):
    """kernel_scratch_bytes as the cost model calls it: on fake tensors, inside fake mode."""
    fm, fargs = _fake(args)
    with probes.recording() as rec, fm:
        out = func(*fargs, **(kwargs or {}))
        got = probes.kernel_scratch_bytes(func, fargs, kwargs, out)
    return got, rec


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path / "cache"))
    probes.clear_memo()
    yield tmp_path / "cache" / probes.CACHE_FILE
    probes.clear_memo()


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMFIT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert probes.cache_path() == tmp_path / "xdg" / "memfit" / "probes-v1.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert probes.cache_dir() == tmp_path / "home" / ".cache" / "memfit"


def test_cache_round_trip(cache, monkeypatch):
    args = _conv_bwd_args()
    first, rec = _probe(args)
    assert first > 0 and cache.exists()
    assert rec.note().startswith("kernel scratch probed on cpu (1 probes, 0 from cache): aten.convolution_backward x1")
    data = json.loads(cache.read_text())
    assert data["format"] == 1 and list(data["probes"].values()) == [{"scratch_bytes": first}]

    # A new process (empty memo) reads the file and runs nothing.
    probes.clear_memo()
    monkeypatch.setattr(probes, "_measure", lambda *a: pytest.fail("probe ran despite the cache"))
    again, rec = _probe(args)
    assert again == first
    assert "(1 probes, 1 from cache)" in rec.note()


def test_corrupt_cache_is_ignored_and_replaced(cache, caplog):
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    with caplog.at_level(logging.INFO, logger="memfit.cost_models.probes"):
        got, _ = _probe(_conv_bwd_args())
    assert got == probes.measure_scratch(CONV_BWD, _conv_bwd_args())
    assert "ignoring unreadable probe cache" in caplog.text
    assert len(json.loads(cache.read_text())["probes"]) == 1


def test_unwritable_cache_keeps_probes_in_memory(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(blocker / "cache"))   # a directory under a file
    probes.clear_memo()
    try:
        with caplog.at_level(logging.INFO, logger="memfit.cost_models.probes"):
            first, _ = _probe(_conv_bwd_args())
        assert first > 0 and "cannot write probe cache" in caplog.text
        monkeypatch.setattr(probes, "_measure", lambda *a: pytest.fail("memo missed"))
        assert _probe(_conv_bwd_args())[0] == first
    finally:
        probes.clear_memo()


def test_key_changes_with_thread_count_and_shape(threads):
    args = _conv_bwd_args()
    torch.set_num_threads(1)
    one = probes.probe_key(CONV_BWD, args)
    torch.set_num_threads(2)
    two = probes.probe_key(CONV_BWD, args)
    assert one != two and "threads=1" in one and "threads=2" in two
    assert probes.probe_key(CONV_BWD, _conv_bwd_args(b=5)) != two
    mask = list(args)
    mask[-1] = [False, True, False]      # weight gradient only
    assert probes.probe_key(CONV_BWD, tuple(mask)) != two
    assert torch.__version__ in two and probes.device_signature(torch.device("cpu")) in two


def test_probed_conv_agrees_with_profiler(cache):
    for args in (_conv_bwd_args(), _conv_bwd_args(b=2, cin=64, cout=64, hw=1)):   # 3x3 on 1x1: weight-grad buffers
        probed, _ = _probe(args)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            outs = CONV_BWD(*args)
        direct = probes.profiler_peak(prof) - sum(t.nbytes for t in outs if t is not None)
        assert direct > 0 and probed == direct


def test_forward_conv_and_symbolic_batch(cache):
    """Fake tensors with a symbolic batch are probed at its value."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    x, w = torch.zeros(4, 8, 16, 16), torch.zeros(16, 8, 3, 3)
    fm = FakeTensorMode(shape_env=ShapeEnv())
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * 3,
                                   constraint_sizes=[None] * 4)
    fx, fw = fm.from_tensor(x, symbolic_context=ctx), fm.from_tensor(w)
    assert isinstance(fx.shape[0], torch.SymInt)
    conv = aten.convolution.default
    rest = (None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    with probes.recording(), fm:
        out = conv(fx, fw, *rest)
        got = probes.kernel_scratch_bytes(conv, (fx, fw, *rest), {}, out)
    assert got == probes.measure_scratch(conv, (x, w, *rest))


def test_large_shapes_extrapolate_in_batch(cache, monkeypatch):
    args = _conv_bwd_args(b=32, cin=8, cout=8, hw=16)
    exact = probes.measure_scratch(CONV_BWD, args)
    monkeypatch.setattr(probes, "PROBE_CAP_BYTES", 256 * 1024)    # 10 samples: a batch line
    got, rec = _probe(args)
    assert "extrapolated in the batch size" in rec.note()
    assert abs(got - exact) <= probes.LINEAR_RTOL * exact
    line = next(v for k, v in json.loads(cache.read_text())["probes"].items() if "batch-line" in k)
    assert line["linear"] and len(line["points"]) == 3


def test_unprobed_cases_cost_nothing_and_are_noted(cache):
    assert probes.kernel_scratch_bytes(aten.mm.default, (torch.zeros(2, 2), torch.zeros(2, 2))) == 0
    meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in _conv_bwd_args())
    assert probes.kernel_scratch_bytes(CONV_BWD, meta) == 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True):   # profilers do not nest
        got, rec = _probe(_conv_bwd_args())
    assert got == 0 and "1 not probed (a torch.profiler session is already running" in rec.note()
    assert not cache.exists() or not json.loads(cache.read_text())["probes"]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])   # sgd: the peak is in backward, beside conv scratch
def test_resnet_prediction_holds_at_one_and_two_threads(optimizer, threads):
    mod = importlib.import_module("examples.resnet_like")
    for n in (1, 2):
        torch.set_num_threads(n)
        model, inputs = mod.make(batch_size=4, image_size=32, width=8)
        p = memfit.plan(model, example_inputs=inputs, optimizer=optimizer, loss_fn=mod.loss_fn, symbolic=False)
        m = memfit.measure(model, example_inputs=inputs, optimizer=optimizer, loss_fn=mod.loss_fn)
        assert abs(p.peak_bytes - m.peak_bytes) <= 0.10 * m.peak_bytes, (n, p.peak_bytes, m.peak_bytes)
        note = next(x for x in p.notes if x.startswith("kernel scratch probed on cpu"))
        assert "aten.convolution_backward x" in note and "not probed" not in note
