"""Chain dynamic program: which spans of a chain of units to recompute.

Units are consecutive pieces of the forward pass (blocks, halves of blocks) in execution
order. Recomputing the span of units [i, j) drops the activations those units save for
backward and keeps only the span's input instead; in backward the span runs again, so its
saved activations exist once more while its backward runs. The peak model (bytes):

    peak = max(floor, fixed + sum(saved[u] for kept units u)
                            + sum(boundary[i] + output[j - 1] for recomputed spans [i, j))
                            + max(sum(saved[i:j]) for recomputed spans))

`fixed`: bytes live at the end of the forward besides saved activations (parameters,
optimizer state, inputs, the loss). `floor`: the part of the step's peak that recompute
cannot lower (for example the end of backward, when gradients are all live).
`boundary[i]`: bytes a recomputed span starting at unit i keeps that would otherwise be
freed (its input, where no other operator saves it). `output[u]`: the part of `saved[u]`
that stays saved when a span ends at unit u (the unit's output, saved by the operators
after it); inside a span the outputs of its inner units are dropped too. The model is conservative: it keeps
every other unit's activations live while the largest span is recomputed, whereas the
later units' activations are in fact freed by then. Extra time is the sum of the
recomputed units' forward times (`time[u]`, seconds).

The dynamic program runs over units and quantized memory (`buckets` steps of the total,
rounded up, so a plan's exact peak is never above its quantized estimate), for each cap on
the largest span; every (cap, memory) cell gives one candidate plan and the Pareto
frontier of those is returned (`chain_frontier`). Time O(K^2 * buckets * caps) with numpy
over the buckets; K up to about a hundred units stays well under a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from memfit.planning.frontier import pareto, pick


@dataclass(frozen=True)
class ChainPlan:
    """Recompute the units of each span [i, j); keep the rest."""

    spans: tuple[tuple[int, int], ...]
    peak_bytes: int
    extra_time_s: float

    def key(self):
        return (sum(j - i for i, j in self.spans), self.spans)

    def recomputed_units(self) -> list[int]:
        return [u for i, j in self.spans for u in range(i, j)]


def _check(saved, boundary, time, output):
    if not (len(saved) == len(boundary) == len(time) == len(output)):
        raise ValueError(f"saved, boundary, time and output must have one entry per unit "
                         f"(got {len(saved)}, {len(boundary)}, {len(time)}, {len(output)})")
    for name, xs in (("saved", saved), ("boundary", boundary), ("time", time), ("output", output)):
        if any(x < 0 for x in xs):
            raise ValueError(f"{name} entries must be non-negative")


def chain_peak(saved: Sequence[int], boundary: Sequence[int], spans, fixed: int = 0, floor: int = 0,
               output: Sequence[int] | None = None) -> int:
    """Predicted peak (bytes) of recomputing `spans` under the model in the module doc."""
    output = output if output is not None else [0] * len(saved)
    rec = set()
    extra = 0
    biggest = 0
    prev_end = 0
    for i, j in sorted(spans):
        if not (0 <= i < j <= len(saved)) or i < prev_end:
            raise ValueError(f"spans must be disjoint, ordered and inside the chain: {spans}")
        prev_end = j
        rec.update(range(i, j))
        extra += boundary[i] + output[j - 1]
        biggest = max(biggest, sum(saved[i:j]))
    kept = sum(s for u, s in enumerate(saved) if u not in rec)
    return max(floor, fixed + kept + extra + biggest)


def chain_frontier(saved: Sequence[int], boundary: Sequence[int], time: Sequence[float], *,
                   fixed: int = 0, floor: int = 0, output: Sequence[int] | None = None,
                   buckets: int = 256, max_caps: int = 24, max_span: int | None = None) -> list[ChainPlan]:
    """Pareto frontier (extra time ascending, peak descending) of span choices.

    `output`: per unit, bytes still kept when a span ends there (default 0).
    `max_span`: most units one span may hold (None: any).
    """
    output = list(output) if output is not None else [0] * len(saved)
    _check(saved, boundary, time, output)
    K = len(saved)
    none = ChainPlan((), chain_peak(saved, boundary, (), fixed, floor, output), 0.0)
    if K == 0:
        return [none]
    total = sum(saved) + sum(boundary) + sum(output)
    if total == 0:
        return [none]
    delta = max(1.0, total / buckets)
    Q = int(math.ceil(total / delta)) + K + 1
    qs = [int(math.ceil(s / delta)) for s in saved]
    qb = [int(math.ceil(b / delta)) for b in boundary]
    qo = [int(math.ceil(o / delta)) for o in output]
    csum = [0]
    for s in saved:
        csum.append(csum[-1] + s)
    tsum = [0.0]
    for t in time:
        tsum.append(tsum[-1] + t)
    span_limit = K if max_span is None else max(1, max_span)
    span_sums = sorted({csum[j] - csum[i] for i in range(K) for j in range(i + 1, min(K, i + span_limit) + 1)})
    # Caps on the largest span: every distinct span sum when few, else quantiles of them.
    if len(span_sums) > max_caps:
        idx = sorted({int(round(k * (len(span_sums) - 1) / (max_caps - 1))) for k in range(max_caps)})
        caps = [span_sums[k] for k in idx]
    else:
        caps = span_sums
    plans = [none]
    INF = np.inf
    for cap in caps:
        # g[j][m]: least time covering units [0, j) with quantized memory m.
        g = [np.full(Q, INF) for _ in range(K + 1)]
        back: list[np.ndarray | None] = [None] * (K + 1)   # predecessor choice per cell
        g[0][0] = 0.0
        for k in range(1, K + 1):
            best = np.full(Q, INF)
            choice = np.full(Q, -1, dtype=np.int64)   # -1: keep unit k-1; i >= 0: span [i, k)
            # keep unit k-1
            sh = qs[k - 1]
            if sh < Q:
                cand = np.full(Q, INF)
                cand[sh:] = g[k - 1][:Q - sh]
                better = cand < best
                best[better] = cand[better]
                choice[better] = -1
            for i in range(max(0, k - span_limit), k):
                if csum[k] - csum[i] > cap:
                    continue
                sh = qb[i] + qo[k - 1]
                cand = np.full(Q, INF)
                cand[sh:] = g[i][:Q - sh] + (tsum[k] - tsum[i])
                better = cand < best
                best[better] = cand[better]
                choice[better] = i
            g[k] = best
            back[k] = choice
        for m in _useful_cells(g[K]):
            spans = []
            k, mm = K, int(m)
            while k > 0:
                c = int(back[k][mm])
                if c == -1:
                    mm -= qs[k - 1]
                    k -= 1
                else:
                    spans.append((c, k))
                    mm -= qb[c] + qo[k - 1]
                    k = c
            spans = tuple(sorted(spans))
            plans.append(ChainPlan(spans, chain_peak(saved, boundary, spans, fixed, floor, output),
                                   sum(tsum[j] - tsum[i] for i, j in spans)))
    return pareto(plans)


def _useful_cells(row: np.ndarray):
    """Memory cells whose time beats every cell with less memory (the others are dominated)."""
    best = np.inf
    for m in np.nonzero(np.isfinite(row))[0]:
        if row[m] < best:
            best = row[m]
            yield int(m)


def solve_chain(saved: Sequence[int], boundary: Sequence[int], time: Sequence[float], budget: int, *,
                fixed: int = 0, floor: int = 0, **kw) -> ChainPlan | None:
    """The fastest plan whose predicted peak fits `budget` bytes; None if none does."""
    return pick(chain_frontier(saved, boundary, time, fixed=fixed, floor=floor, **kw), budget)
