"""Pure solver tests: hand-computed cases, brute force, budget monotonicity."""

import itertools
import random

import pytest

from memfit.planning import (Selective, chain_frontier, chain_peak, knapsack_frontier, knapsack_peak, pick,
                             solve_chain, solve_knapsack)


def test_chain_peak_hand_computed():
    saved, boundary = [100, 100, 100, 100], [10, 10, 10, 10]
    assert chain_peak(saved, boundary, (), fixed=50) == 450
    # recompute [0,2): end of forward keeps 10 + 200; its backward holds 10 + 200 again
    assert chain_peak(saved, boundary, ((0, 2),), fixed=50) == 50 + 210
    # recompute each unit alone: the last one's backward: 3 boundaries + its input + 100
    assert chain_peak(saved, boundary, ((0, 1), (1, 2), (2, 3), (3, 4)), fixed=50) == 50 + 30 + 10 + 100
    # recomputing only the last unit does not help: everything before it is still live
    assert chain_peak(saved, boundary, ((3, 4),), fixed=50) == 50 + 300 + 10 + 100
    assert chain_peak(saved, boundary, (), fixed=50, floor=1000) == 1000
    with pytest.raises(ValueError):
        chain_peak(saved, boundary, ((0, 2), (1, 3)))
    # a span's last unit keeps its output's saved bytes (used after the span)
    out = [5, 6, 7, 8]
    assert chain_peak(saved, boundary, ((0, 2),), fixed=50, output=out) == 50 + 216


def test_chain_hand_computed_choice():
    # Unit 1 is expensive to recompute. Recomputing unit 0 alone: peak max(10 + 300,
    # 10 + 100) = 310, time 1. Units 0 and 2: max(220, 110, 100 + 10 + 10 + 100) = 220,
    # time 2. Units 0, 1, 2 alone with unit 3 kept: max(30 + 100, 20 + 10 + 100) = 130 at
    # time 12, lower than all four alone (140: the last one's recompute sits on 3 inputs).
    saved, boundary, time = [100, 100, 100, 100], [10, 10, 10, 10], [1.0, 10.0, 1.0, 1.0]
    p = solve_chain(saved, boundary, time, 330)
    assert p.spans == ((0, 1),) and p.peak_bytes == 310 and p.extra_time_s == 1.0
    p = solve_chain(saved, boundary, time, 300)
    assert p.peak_bytes == 220 and p.extra_time_s == 2.0
    p = solve_chain(saved, boundary, time, 150)
    assert p.spans == ((0, 1), (1, 2), (2, 3)) and p.peak_bytes == 130 and p.extra_time_s == 12.0
    assert solve_chain(saved, boundary, time, 129) is None
    assert solve_chain(saved, boundary, time, 10**9).spans == ()


def test_chain_merging_spans_saves_boundaries():
    # Large boundaries: one span of two units beats two spans of one unit each.
    # (0,2): max(40 + 100 kept, 40 + 100 recomputed) = 140; (0,1),(1,2): 80 + 100 = 180.
    saved, boundary, time = [50, 50, 50, 50], [40, 40, 40, 40], [1.0] * 4
    p = solve_chain(saved, boundary, time, 150)
    assert p.spans == ((0, 2),) and p.peak_bytes == 140
    assert solve_chain(saved, boundary, time, 139) is None


def _all_span_choices(K):
    # every way to cut [0, K) into kept units and recomputed spans
    def rec(i):
        if i == K:
            yield ()
            return
        for rest in rec(i + 1):
            yield rest                                  # keep unit i
        for j in range(i + 1, K + 1):
            for rest in rec(j):
                yield ((i, j),) + rest
    return list(rec(0))


@pytest.mark.parametrize("seed", range(12))
def test_chain_matches_brute_force(seed):
    rng = random.Random(seed)
    K = rng.randint(1, 6)
    saved = [rng.randint(0, 100) for _ in range(K)]
    boundary = [rng.randint(0, 30) for _ in range(K)]
    time = [rng.choice([0.5, 1.0, 2.0, 3.0]) for _ in range(K)]
    output = [rng.randint(0, s) for s in saved]
    fixed = rng.randint(0, 50)
    choices = _all_span_choices(K)
    front = chain_frontier(saved, boundary, time, fixed=fixed, output=output, buckets=4096, max_caps=10**4)
    _agrees_with_brute_force(front, [(sum(time[u] for i, j in c for u in range(i, j)),
                                      chain_peak(saved, boundary, c, fixed, output=output)) for c in choices],
                             range(fixed, fixed + sum(saved) + 2, 7))


def _agrees_with_brute_force(front, options, budgets):
    """`pick(front, b)` is as fast as the fastest of `options` ((seconds, peak)) fitting b."""
    for budget in budgets:
        best = min((t for t, peak in options if peak <= budget), default=None)
        p = pick(front, budget)
        if best is None:
            assert p is None
        else:
            assert p is not None and p.peak_bytes <= budget
            assert p.extra_time_s == pytest.approx(best)


def test_selective_span_hand_computed():
    # Three units of 100 saved bytes, 40 of which are matmul outputs (saved by autograd
    # anyway: no extra); recomputing a unit selectively costs 1 s instead of 4.
    saved, boundary, time = [100, 100, 100], [10, 10, 10], [4.0, 4.0, 4.0]
    sel = Selective(kept=[40] * 3, kept_out=[0] * 3, extra=[0] * 3, time_saved=[3.0] * 3, ok=[True] * 3)
    two = ((0, 1), (1, 2))
    # end of forward: 2 x (10 + 40) + 100; unit 1's backward: 50 + 10 + 100
    assert chain_peak(saved, boundary, two, selective=sel, selective_spans=two) == 200
    assert chain_peak(saved, boundary, two) == 120
    # one span over units 0 and 1: keeps 10 + 80, its backward holds 10 + 200
    assert chain_peak(saved, boundary, ((0, 2),), selective=sel, selective_spans=((0, 2),)) == 210
    front = chain_frontier(saved, boundary, time, selective=sel, buckets=4096)
    p = pick(front, 200)
    assert p.spans == two and p.selective == two and p.extra_time_s == 2.0
    p = pick(front, 199)    # one unit whole, one selectively: 160 or 170 at 5 s
    assert p.peak_bytes <= 199 and p.extra_time_s == 5.0 and len(p.selective) == 1
    assert pick(chain_frontier(saved, boundary, time, buckets=4096), 200).extra_time_s == 8.0
    # a unit that may not be recomputed selectively never is
    no = Selective(kept=[40] * 3, kept_out=[0] * 3, extra=[0] * 3, time_saved=[3.0] * 3, ok=[True, False, True])
    front = chain_frontier(saved, boundary, time, selective=no, buckets=4096)
    assert all(1 not in range(i, j) for p in front for i, j in p.selective)
    with pytest.raises(ValueError):
        chain_peak(saved, boundary, two, selective_spans=two)


@pytest.mark.parametrize("seed", range(12))
def test_chain_with_selective_spans_matches_brute_force(seed):
    rng = random.Random(500 + seed)
    K = rng.randint(1, 5)
    saved = [rng.randint(0, 100) for _ in range(K)]
    boundary = [rng.randint(0, 30) for _ in range(K)]
    time = [rng.choice([1.0, 2.0, 3.0, 4.0]) for _ in range(K)]
    output = [rng.randint(0, s) for s in saved]
    kept = [rng.randint(0, s) for s in saved]
    sel = Selective(kept=kept, kept_out=[rng.randint(0, k) for k in kept], extra=[rng.randint(0, 10) for _ in kept],
                    time_saved=[rng.choice([0.0, 0.5, 1.0]) for _ in kept], ok=[rng.random() < 0.8 for _ in kept])
    fixed = rng.randint(0, 50)
    choices = []
    for c in _all_span_choices(K):
        allowed = [sp for sp in c if sel.allowed(*sp)]
        for bits in itertools.product((0, 1), repeat=len(allowed)):
            choices.append((c, tuple(sp for sp, b in zip(allowed, bits) if b)))

    def secs(c, s):
        return sum(time[u] - (sel.time_saved[u] if (i, j) in s else 0.0) for i, j in c for u in range(i, j))

    front = chain_frontier(saved, boundary, time, fixed=fixed, output=output, selective=sel, buckets=4096,
                           max_caps=10**4)
    for p in front:   # each plan's figures are its own
        assert p.peak_bytes == chain_peak(saved, boundary, p.spans, fixed, 0, output, sel, p.selective)
        assert p.extra_time_s == pytest.approx(secs(p.spans, p.selective))
    _agrees_with_brute_force(front, [(secs(c, s), chain_peak(saved, boundary, c, fixed, 0, output, sel, s))
                                     for c, s in choices], range(fixed, fixed + sum(saved) + sum(kept) + 2, 7))


def test_nested_span_hand_computed():
    # Four units of 100 saved bytes whose outputs (20 B) cross into the next: one nested span
    # keeps 10 + 20 at the end of forward; its backward holds 10 + 3 x 20 inputs + 100
    # (the first unit's backward), instead of 10 + 400 for the whole span, at twice the time.
    saved, boundary, out, time = [100] * 4, [10, 0, 0, 0], [20] * 4, [1.0] * 4
    assert chain_peak(saved, boundary, ((0, 4),), output=out, nested_spans=((0, 4),)) == 10 + 60 + 100
    assert chain_peak(saved, boundary, ((0, 4),), output=out) == 410
    front = chain_frontier(saved, boundary, time, output=out, nested=True, buckets=4096)
    low = front[-1]
    assert low.nested and low.peak_bytes <= 170
    assert chain_frontier(saved, boundary, time, output=out, buckets=4096)[-1].peak_bytes > low.peak_bytes
    with pytest.raises(ValueError):
        chain_peak(saved, boundary, ((0, 1),), output=out, nested_spans=((0, 1),))


@pytest.mark.parametrize("seed", range(10))
def test_chain_with_nested_and_selective_spans_matches_brute_force(seed):
    rng = random.Random(900 + seed)
    K = rng.randint(2, 5)
    saved = [rng.randint(0, 100) for _ in range(K)]
    boundary = [rng.randint(0, 30) for _ in range(K)]
    time = [rng.choice([1.0, 2.0, 3.0]) for _ in range(K)]
    output = [rng.randint(0, s) for s in saved]
    kept = [rng.randint(0, s) for s in saved]
    sel = Selective(kept=kept, kept_out=[rng.randint(0, k) for k in kept], extra=[0] * K,
                    time_saved=[rng.choice([0.0, 0.5]) for _ in kept], ok=[rng.random() < 0.7 for _ in kept])
    fixed = rng.randint(0, 50)

    def region_s(i, j, mode):   # odd seeds: a cost per region, per unit and per mode, as the planner's
        return (0.5 + 0.25 * (j - i) + (0.25 if mode == 1 else 0.0) + (0.5 * (j - i) if mode == 2 else 0.0)
                if seed % 2 else 0.0)

    options = []
    for c in _all_span_choices(K):
        per_span = [[0] + ([1] if sel.allowed(*sp) else []) + ([2] if sp[1] - sp[0] >= 2 else []) for sp in c]
        for modes in itertools.product(*per_span):
            s_sp = tuple(sp for sp, m in zip(c, modes) if m == 1)
            n_sp = tuple(sp for sp, m in zip(c, modes) if m == 2)
            secs = sum((2.0 if m == 2 else 1.0) * sum(time[i:j]) - (sum(sel.time_saved[i:j]) if m == 1 else 0.0)
                       + region_s(i, j, m) for (i, j), m in zip(c, modes))
            options.append((secs, chain_peak(saved, boundary, c, fixed, 0, output, sel, s_sp, n_sp)))
    front = chain_frontier(saved, boundary, time, fixed=fixed, output=output, selective=sel, nested=True,
                           buckets=4096, max_caps=10**4, region_s=region_s if seed % 2 else None)
    for p in front:
        assert p.peak_bytes == chain_peak(saved, boundary, p.spans, fixed, 0, output, sel, p.selective, p.nested)
    _agrees_with_brute_force(front, options, range(fixed, fixed + sum(saved) + sum(kept) + 2, 7))


@pytest.mark.parametrize("seed", range(20))
def test_chain_monotone_in_budget(seed):
    rng = random.Random(100 + seed)
    K = rng.randint(1, 14)
    saved = [rng.randint(0, 10**6) for _ in range(K)]
    boundary = [rng.randint(0, 2 * 10**5) for _ in range(K)]
    time = [rng.random() for _ in range(K)]
    fixed, floor = rng.randint(0, 10**6), rng.randint(0, 2 * 10**6)
    last_peak, last_time = None, None
    top = fixed + sum(saved) + sum(boundary)
    front = chain_frontier(saved, boundary, time, fixed=fixed, floor=floor)
    for n, budget in enumerate(range(top, 0, -max(1, top // 97))):
        # solve_chain picks from the same budget-free frontier; check it agrees now and then
        p = pick(front, budget)
        if n % 25 == 0:
            assert p == solve_chain(saved, boundary, time, budget, fixed=fixed, floor=floor)
        if p is None:
            last_peak = -1          # once nothing fits, nothing may fit below
            continue
        assert last_peak != -1, "a plan appeared below a budget that had none"
        assert p.peak_bytes <= budget
        if last_peak is not None:
            assert p.peak_bytes <= last_peak
            assert p.extra_time_s >= last_time - 1e-12
        last_peak, last_time = p.peak_bytes, p.extra_time_s


def test_knapsack_hand_computed():
    saved, boundary, time = [100, 60, 30], [10, 10, 40], [5.0, 1.0, 1.0]
    assert knapsack_peak(saved, boundary, (), fixed=10) == 200
    # region 2 never helps (keeps more than it saves) and is never chosen
    front = knapsack_frontier(saved, boundary, time, fixed=10)
    assert all(2 not in p.recompute for p in front)
    # recompute 1: 10 + 130 + 10 + 60 = 210 > 200: no gain; recompute 0: 10+90+10+100 = 210;
    # both: 10 + 30 + 20 + 100 = 160
    p = solve_knapsack(saved, boundary, time, 180, fixed=10)
    assert p.recompute == (0, 1) and p.peak_bytes == 160 and p.extra_time_s == 6.0
    assert solve_knapsack(saved, boundary, time, 150, fixed=10) is None


@pytest.mark.parametrize("seed", range(10))
def test_knapsack_brute_force_and_monotone(seed):
    rng = random.Random(seed)
    R = rng.randint(1, 7)
    saved = [rng.randint(0, 100) for _ in range(R)]
    boundary = [rng.randint(0, 30) for _ in range(R)]
    time = [rng.choice([0.5, 1.0, 2.0]) for _ in range(R)]
    front = knapsack_frontier(saved, boundary, time, buckets=4096)
    last = None
    for budget in range(sum(saved) + 1, -1, -3):
        best = min((sum(time[r] for r in c) for k in range(R + 1) for c in itertools.combinations(range(R), k)
                    if knapsack_peak(saved, boundary, c) <= budget), default=None)
        p = pick(front, budget)
        assert (p is None) == (best is None)
        if p is not None:
            assert p.extra_time_s == pytest.approx(best)
            if last is not None:
                assert p.peak_bytes <= last
            last = p.peak_bytes


def test_bad_input():
    with pytest.raises(ValueError):
        chain_frontier([1, 2], [1], [1.0, 1.0])
    with pytest.raises(ValueError):
        knapsack_frontier([-1], [0], [0.0])
