"""The one budget search: the first candidate, in the caller's order, whose evaluated figure
meets a target.

Every budget decision in memfit is this question over an ordered list of candidates whose
figure (a predicted peak, or saved bytes) falls, mostly, along the list, and whose
evaluation is expensive (a whole simulated step, or a partition of the joint graph):

- checkpoint plans on the Pareto frontier, fastest first (memfit.planning.checkpoint);
- prefixes of the saved tensors ranked for quantization, shortest first
  (memfit.planning.quantize);
- partitions of the torch.compile backend, least recompute first (memfit.compile).

`first_fit` brackets the answer between an index known to miss the target and one known to
meet it, and probes inside the bracket: by regula falsi on the caller's `position` of each
candidate (bytes saved, or a ratio), kept to the middle third of the bracket, and by
bisection once two probes in a row moved the same end, so a bent curve cannot stall it. The
index it returns was evaluated and met the target; it is the first that does when the figure
falls monotonically along the list (`exact` tells when the candidate before it was evaluated
and missed). Pure Python: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

__all__ = ["Fit", "first_fit"]


@dataclass(frozen=True)
class Fit:
    """What first_fit found.

    index: the candidate chosen (evaluated, figure <= target), or None when the candidate
    given as the floor misses the target. exact: the candidate before `index` was evaluated
    and missed (or index is 0). evaluated: every figure seen, by index.
    """

    index: int | None
    figure: float | None
    exact: bool
    evaluations: int
    evaluated: dict = field(default_factory=dict)


def first_fit(n: int, evaluate: Callable[[int], float], target: float, *, known: dict | None = None,
              floor_index: int | None = None, position: Sequence[float] | None = None,
              max_evals: int = 8, good_enough: Callable[[float], bool] | None = None) -> Fit:
    """The first index i in [0, n) with evaluate(i) <= target, for figures that fall along i.

    known: figures already known, by index (not counted as evaluations). floor_index: the
    candidate the caller takes as its floor (default n - 1); indices after it are never
    probed, and when its figure misses the target there is no answer (index None).
    position[i]: where candidate i lies for interpolation (increasing in i; default i).
    max_evals: most calls of `evaluate` (the floor's included when it was not known).
    good_enough(figure): a fitting probe that satisfies it ends the search early (the backend
    stops within a tolerance of the target instead of refining to the exact boundary).
    """
    if n <= 0:
        return Fit(None, None, False, 0, {})
    seen: dict[int, float] = dict(known or {})
    calls = 0

    def value(i: int) -> float:
        nonlocal calls
        if i not in seen:
            calls += 1
            seen[i] = evaluate(i)
        return seen[i]

    hi = n - 1 if floor_index is None else floor_index
    if value(hi) > target:
        return Fit(None, seen[hi], False, calls, seen)
    # the bracket: lo misses (or is -1: nothing before 0), hi meets
    fits = [i for i, v in seen.items() if i <= hi and v <= target]
    hi = min(fits)
    misses = [i for i, v in seen.items() if i < hi and v > target]
    lo = max(misses) if misses else -1
    if lo == -1 and hi > 0 and calls < max_evals:
        # nothing known to miss: the first candidate is the natural first probe
        if value(0) <= target:
            return Fit(0, seen[0], True, calls, seen)
        lo = 0
    pos = position if position is not None else range(n)
    last, same = None, 0
    while hi - lo > 1 and calls < max_evals:
        if good_enough is not None and good_enough(seen[hi]):
            break
        if same >= 2 or lo < 0 or seen[lo] <= seen[hi]:
            k = (lo + hi) // 2
        else:
            # regula falsi on position: where the line between the two ends crosses the target
            x = pos[lo] + (seen[lo] - target) / (seen[lo] - seen[hi]) * (pos[hi] - pos[lo])
            k = next((i for i in range(lo + 1, hi) if pos[i] >= x), hi - 1)
            third = -(-(hi - lo) // 3)  # keep to the middle third: the bracket shrinks by a third at least
            k = min(max(k, lo + third), hi - third)
        side = "hi" if value(k) <= target else "lo"
        if side == "hi":
            hi = k
        else:
            lo = k
        same = same + 1 if side == last else 1
        last = side
    return Fit(hi, seen[hi], hi == 0 or (lo == hi - 1 and lo in seen and seen[lo] > target), calls, seen)
