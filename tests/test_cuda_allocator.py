"""The simulated CUDA caching allocator (memfit.cost_models.cuda_allocator) against the rules of
PyTorch's native allocator, worked out by hand for each case below; budget_of and the refit of a
plan the allocator puts over its budget. The comparison with a real GPU's
max_memory_allocated / max_memory_reserved runs in tools/gpu_check.sh."""

from types import SimpleNamespace

import pytest
import torch

import memfit
from memfit.api import refit_targets
from memfit.cost_models.cuda_allocator import (AllocatorConfig, CachingAllocator, predict, replay_steps,
                                               round_size, segment_size)

KiB, MiB = 1 << 10, 1 << 20


def test_requests_are_rounded_and_segments_sized_as_the_allocator_does():
    assert [round_size(n) for n in (1, 511, 512, 513, 4096)] == [512, 512, 512, 1024, 4096]
    assert segment_size(MiB) == 2 * MiB                        # small pool: 2 MiB segments
    assert segment_size(MiB + 512) == 20 * MiB                 # 1-10 MiB: a 20 MiB segment
    assert segment_size(10 * MiB - 512) == 20 * MiB
    assert segment_size(10 * MiB) == 10 * MiB                  # from 10 MiB: rounded to 2 MiB
    assert segment_size(11 * MiB) == 12 * MiB


def test_small_requests_pack_into_two_mib_segments():
    a = CachingAllocator()
    blocks = [a.malloc(400 * KiB) for _ in range(5)]           # 5 x 400 KiB fit one 2 MiB segment
    assert (a.allocated, a.reserved) == (5 * 400 * KiB, 2 * MiB)
    blocks.append(a.malloc(400 * KiB))                         # the sixth needs a second one
    assert a.reserved == 4 * MiB
    for b in blocks:
        a.free(b)
    assert (a.allocated, a.reserved, a.peak_allocated) == (0, 4 * MiB, 6 * 400 * KiB)


def test_an_unsplit_block_counts_whole_in_allocated():
    a = CachingAllocator()
    a.malloc(int(1.5 * MiB))       # a 20 MiB segment; the rest, 18.5 MiB, is split off
    assert (a.allocated, a.reserved) == (int(1.5 * MiB), 20 * MiB)
    a.malloc(18 * MiB)             # takes the 18.5 MiB block; its 0.5 MiB rest is not split
    assert a.allocated == 20 * MiB and a.reserved == 20 * MiB
    b = CachingAllocator()
    b.malloc(11 * MiB)             # its own 12 MiB segment, the 1 MiB rest not split
    assert (b.allocated, b.reserved) == (12 * MiB, 12 * MiB)


def test_freed_neighbours_merge_and_serve_a_larger_request():
    a = CachingAllocator()
    x, y = a.malloc(4 * MiB), a.malloc(4 * MiB)                # one 20 MiB segment
    a.free(x)
    a.free(y)
    a.malloc(16 * MiB)             # fits the merged 20 MiB block: no new segment
    assert a.reserved == 20 * MiB
    c = CachingAllocator()
    x, y = c.malloc(4 * MiB), c.malloc(4 * MiB)
    c.free(x)                      # y still holds the middle: 4 + 12 MiB free, apart
    c.malloc(16 * MiB)
    assert c.reserved == 20 * MiB + 16 * MiB


def test_best_fit_takes_the_smallest_free_block():
    a = CachingAllocator()
    big = a.malloc(12 * MiB)       # its own 12 MiB segment
    small_seg = [a.malloc(3 * MiB) for _ in range(2)]          # a 20 MiB segment, 14 MiB rest
    a.free(big)
    a.malloc(12 * MiB)             # best fit: the 12 MiB block, not the 14 MiB rest
    assert a.reserved == 32 * MiB
    a.malloc(14 * MiB)             # the 14 MiB rest, exactly
    assert a.reserved == 32 * MiB and a.allocated == 12 * MiB + 6 * MiB + 14 * MiB
    del small_seg


def test_expandable_segments_grow_by_pages():
    a = CachingAllocator(AllocatorConfig(expandable_segments=True))
    for _ in range(3):
        a.malloc(int(1.5 * MiB))   # one large segment, one 20 MiB page mapped
    assert a.reserved == 20 * MiB
    a.malloc(30 * MiB)             # 15.5 MiB free at the end: one more page
    assert a.reserved == 40 * MiB
    d = CachingAllocator()
    for _ in range(3):
        d.malloc(int(1.5 * MiB))
    d.malloc(30 * MiB)             # default segments: a 30 MiB one of its own
    assert d.reserved == 50 * MiB


def test_allocator_options_are_read_and_unmodelled_ones_named():
    assert AllocatorConfig.from_env({}) == AllocatorConfig()
    assert AllocatorConfig.from_env({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}).expandable_segments
    cfg = AllocatorConfig.from_env({"PYTORCH_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:True"})
    assert cfg.expandable_segments and cfg.unmodelled == ("max_split_size_mb:128",)
    with pytest.raises(ValueError, match="max_split_size_mb:128"):
        CachingAllocator(cfg)
    peaks, note = predict([], 0, environ={"PYTORCH_CUDA_ALLOC_CONF": "roundup_power2_divisions:4"})
    assert peaks is None and "roundup_power2_divisions:4" in note and "not predicted" in note


def _store(nbytes):
    return SimpleNamespace(nbytes=nbytes)


def test_steps_replayed_reuse_their_cached_segments():
    w, act, grad = _store(3 * MiB), _store(8 * MiB), _store(3 * MiB)
    events = [(1, w, "start"),
              (1, act, "forward"), (1, grad, "backward"), (-1, act, "backward")]
    one = replay_steps(events, 1, AllocatorConfig(), steps=1)
    three = replay_steps(events, 1, AllocatorConfig(), steps=3)
    # the weight and the activation share a 20 MiB segment; the gradient's 3 MiB fits its rest
    assert one == (14 * MiB, 20 * MiB) == three
    peaks, note = predict(events, 1, environ={})
    assert peaks == {"allocated": 14 * MiB, "reserved": 20 * MiB, "expandable_segments": False}
    assert "max_memory_reserved 20971520 B" in note


def test_budget_of_is_checked_and_reserved_refused_off_cuda():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    x = torch.randn(4, 8)
    p = memfit.plan(model, "1MiB", example_inputs=(x,), symbolic=False)
    assert p.allocator is None and p.device_peak_bytes == p.peak_bytes and p.budget_of == "allocated"
    with pytest.raises(ValueError, match="budget_of='reserved' .* not run on a CUDA device"):
        memfit.plan(model, "1MiB", example_inputs=(x,), symbolic=False, budget_of="reserved")
    with pytest.raises(ValueError, match="budget_of='total'"):
        memfit.optimize(model, "90%", example_inputs=(x,), budget_of="total")


def _plan(peak, device_peak, budget):
    return SimpleNamespace(allocator={"allocated": device_peak}, device_peak_bytes=device_peak,
                           fits=device_peak <= budget, budget_of="allocated", peak_bytes=peak)


def test_a_plan_over_by_the_allocators_excess_is_planned_again_lower():
    plans = iter([_plan(95, 104, 100), _plan(91, 101, 100), _plan(88, 98, 100)])
    last = [None]
    targets = []
    for t in refit_targets(100, lambda: last[0]):
        targets.append(t)
        last[0] = next(plans)
    assert targets == [100, 96, 95]            # lowered by 4, then by 1 more; the third fits
    last[0] = None
    assert list(refit_targets(100, lambda: last[0])) == [100]          # no plan: no refit
    cpu = SimpleNamespace(allocator=None, fits=False)
    assert list(refit_targets(100, lambda: cpu)) == [100]              # no allocator: no refit
    assert list(refit_targets(None, lambda: cpu)) == [None]


def test_optimize_plans_again_below_the_allocators_excess(monkeypatch):
    """The refit loop end to end on CPU: every analysis is given an allocator whose reserved
    peak is the step's plus 300 kB (as cached segments would add); the plan returned must fit
    by that figure, so its own peak is planned that much lower."""
    import memfit.api as api
    from tests.models import Block

    real = api.analyze_step

    def with_segments(*a, **k):
        r = real(*a, **k)
        r.allocator = {"allocated": r.peak_bytes, "reserved": r.peak_bytes + 300_000, "expandable_segments": False}
        return r

    monkeypatch.setattr(api, "analyze_step", with_segments)
    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(64, heads=2), Block(64, heads=2))
    x = torch.randn(8, 64, 64)
    base = memfit.plan(model, example_inputs=(x,), symbolic=False, budget_of="reserved")
    alone = memfit.optimize(model, int(0.75 * base.peak_bytes), example_inputs=(x,),
                            techniques="checkpoint").memfit_plan          # budget_of="allocated"
    # 150 kB above that plan's peak: it fits the budget by its own peak, not by the reserved one
    budget = alone.peak_bytes + 150_000
    p = memfit.optimize(model, budget, example_inputs=(x,), techniques="checkpoint", budget_of="reserved").memfit_plan
    assert p.budget_of == "reserved" and p.fits and p.device_peak_bytes == p.peak_bytes + 300_000 <= budget
    assert p.peak_bytes < alone.peak_bytes                   # planned lower than for the allocated budget
    with pytest.raises(memfit.BudgetError) as low:
        memfit.optimize(model, 1000, example_inputs=(x,), techniques="checkpoint")
    least = low.value.least_budget           # the least budget of the step's own peak
    # a plan within least + 100 kB exists, but its reserved peak is 300 kB above it
    with pytest.raises(memfit.BudgetError, match="what the CUDA caching allocator adds") as e:
        memfit.optimize(model, least + 100_000, example_inputs=(x,), techniques="checkpoint",
                        budget_of="reserved")
    assert e.value.least_budget > least + 100_000      # the stated least budget is above the refused one
