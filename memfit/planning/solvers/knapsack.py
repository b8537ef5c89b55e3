"""Knapsack over independent regions of a general graph: recompute or keep each.

Region r saves `saved[r]` bytes of activations when recomputed, keeps `boundary[r]`
bytes (its inputs) instead, and costs `time[r]` seconds more. Peak model (bytes), as for
the chain (see memfit.planning.solvers.chain):

    peak = max(floor, fixed + sum(saved of kept regions) + sum(boundary of recomputed)
                            + max(saved of recomputed regions))

The frontier is computed by a 0/1 knapsack over quantized net savings, once per cap on the
largest recomputed region, exactly as torch's activation-checkpointing knapsack solvers do
for a single budget (torch/_functorch/_activation_checkpointing/knapsack.py), but kept
budget-free so every budget picks from the same frontier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from memfit.planning.solvers.chain import _useful_cells
from memfit.planning.solvers.frontier import pareto, pick


@dataclass(frozen=True)
class KnapsackPlan:
    recompute: tuple[int, ...]
    peak_bytes: int
    extra_time_s: float

    def key(self):
        return (len(self.recompute), self.recompute)


def knapsack_peak(saved, boundary, recompute, fixed: int = 0, floor: int = 0) -> int:
    rec = set(recompute)
    kept = sum(s for r, s in enumerate(saved) if r not in rec)
    extra = sum(boundary[r] for r in rec)
    biggest = max((saved[r] for r in rec), default=0)
    return max(floor, fixed + kept + extra + biggest)


def knapsack_frontier(saved: Sequence[int], boundary: Sequence[int], time: Sequence[float], *,
                      fixed: int = 0, floor: int = 0, buckets: int = 256) -> list[KnapsackPlan]:
    """Pareto frontier (extra time ascending, peak descending) of region choices."""
    if not (len(saved) == len(boundary) == len(time)):
        raise ValueError("saved, boundary and time must have one entry per region")
    if any(x < 0 for x in list(saved) + list(boundary) + list(time)):
        raise ValueError("saved, boundary and time must be non-negative")
    R = len(saved)
    none = KnapsackPlan((), knapsack_peak(saved, boundary, (), fixed, floor), 0.0)
    # A region that saves no more than it keeps never helps.
    useful = [r for r in range(R) if saved[r] > boundary[r]]
    if not useful:
        return [none]
    total = sum(saved[r] + boundary[r] for r in useful)
    delta = max(1.0, total / buckets)
    Q = int(math.ceil(total / delta)) + len(useful) + 1
    plans = [none]
    for cap in sorted({saved[r] for r in useful}):
        items = [r for r in useful if saved[r] <= cap]
        # Memory used by an item: kept -> saved, recomputed -> boundary (both rounded up).
        g = np.full(Q, np.inf)
        g[0] = 0.0
        take = np.zeros((len(items), Q), dtype=bool)
        for n, r in enumerate(items):
            a, b = int(math.ceil(saved[r] / delta)), int(math.ceil(boundary[r] / delta))
            keep = np.full(Q, np.inf)
            keep[a:] = g[:Q - a]
            rec = np.full(Q, np.inf)
            rec[b:] = g[:Q - b] + time[r]
            take[n] = rec < keep
            g = np.where(take[n], rec, keep)
        for m in _useful_cells(g):
            chosen = []
            mm = int(m)
            for n in range(len(items) - 1, -1, -1):
                r = items[n]
                if take[n, mm]:
                    chosen.append(r)
                    mm -= int(math.ceil(boundary[r] / delta))
                else:
                    mm -= int(math.ceil(saved[r] / delta))
            chosen = tuple(sorted(chosen))
            # Regions not useful are kept: add their saved bytes via knapsack_peak.
            plans.append(KnapsackPlan(chosen, knapsack_peak(saved, boundary, chosen, fixed, floor),
                                      sum(time[r] for r in chosen)))
    return pareto(plans)


def solve_knapsack(saved, boundary, time, budget: int, *, fixed: int = 0, floor: int = 0,
                   **kw) -> KnapsackPlan | None:
    """The fastest choice whose predicted peak fits `budget` bytes; None if none does."""
    return pick(knapsack_frontier(saved, boundary, time, fixed=fixed, floor=floor, **kw), budget)
