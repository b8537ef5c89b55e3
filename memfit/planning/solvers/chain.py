"""Chain dynamic program: which spans of a chain of units to recompute.

Units are consecutive pieces of the forward pass (blocks, halves of blocks) in execution
order. Recomputing the span of units [i, j) drops the activations those units save for
backward and keeps only the span's input instead; in backward the span runs again, so its
saved activations exist once more while its backward runs. Backward visits the units in
reverse, so when span [i, j) is recomputed the units after it have already been freed:
only what the units before i keep is live beside it (the rotor/Rockmate view of a chain;
Beaumont et al. 2019, "Optimal checkpointing for heterogeneous chains"). Peak model, bytes:

    keep(u)       = saved[u] for a kept unit u
    keep([i, j))  = boundary[i] + output[j - 1] for a recomputed span
    prefix(i)     = sum of keep(.) over units and spans before unit i
    peak = max(floor,
               fixed + prefix(K),                                   # end of forward
               max over spans [i, j): fixed + prefix(i) + boundary[i] + sum(saved[i:j]))

`fixed`: bytes live at the baseline's peak besides saved activations (parameters,
gradients so far, optimizer state, inputs, the loss's temporaries). `floor`: what recompute
cannot lower (for example the end of backward, when every gradient is live).
`boundary[i]`: bytes a span starting at unit i keeps that would otherwise be freed (its
input, where no other operator saves it). `output[u]`: the part of `saved[u]` that stays
saved when a span ends at unit u (its output, saved by the operators after it); inside a
span the outputs of its inner units are dropped too. Gradients that grow during backward
are not in the model; the pass simulates each chosen plan with the cost model to check.
Extra time is the sum of the recomputed units' forward times (`time[u]`, seconds), plus,
where `region_s(i, j, mode)` is given, what each span costs as a region beyond its operators
(torch.utils.checkpoint's own work: memfit.cost_models.overheads.RegionOverhead).

A span may also be recomputed *selectively* (operator-level, `Selective`): the outputs of its
matmuls, convolutions and attention (`kept[u]`) stay saved and only the other operators run
again, so it saves less and costs `time[u] - time_saved[u]`:

    keep_sel([i, j))  = boundary[i] + max(output[j - 1], kept_out[j - 1])
                        + sum(kept[i:j]) - kept_out[j - 1]
    its backward      = fixed + prefix(i) + boundary[i] + sum(saved[i:j]) + sum(extra[i:j])

`kept_out[u]`: the part of `kept[u]` used after the unit (counted once with its output);
`extra[u]`: kept bytes autograd would not have saved.

A span of two units or more may also be recomputed *nested* (two levels, `nested=True`): the
span is one region whose units are each a region of their own. Its forward keeps what a whole
span keeps; in its backward the span's forward runs again keeping only each unit's input
(`in[u] = output[u - 1] + boundary[u]`), and then each unit runs a second time for its own
backward, so only one unit's saved bytes are live at once, for twice the span's time:

    its backward = fixed + prefix(i) + boundary[i]
                   + max over u in [i, j): sum(in[i + 1 .. u]) + saved[u]

The dynamic program runs over units and quantized memory (`buckets` steps of the total,
rounded up, so a plan's exact peak is never above its quantized estimate), once per cap on
the recompute-time peak; every (cap, memory) cell gives one candidate plan and the Pareto
frontier of those is returned (`chain_frontier`). Time O(K^2 * buckets * caps) with numpy
over the buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from memfit.planning.solvers.frontier import pareto, pick


@dataclass(frozen=True)
class ChainPlan:
    """Recompute the units of each span [i, j); keep the rest. The spans in `selective` are
    recomputed selectively (module doc)."""

    spans: tuple[tuple[int, int], ...]
    peak_bytes: int
    extra_time_s: float
    selective: tuple[tuple[int, int], ...] = ()
    nested: tuple[tuple[int, int], ...] = ()

    def key(self):
        return (sum(j - i for i, j in self.spans), self.spans, self.selective, self.nested)

    def recomputed_units(self) -> list[int]:
        return [u for i, j in self.spans for u in range(i, j)]


@dataclass(frozen=True)
class Selective:
    """Per unit, what recomputing it selectively keeps (module doc); `ok[u]` False where a
    unit may not be (an in-place update of a kept output, a nested region)."""

    kept: Sequence[int]
    kept_out: Sequence[int]
    extra: Sequence[int]
    time_saved: Sequence[float]
    ok: Sequence[bool]

    def allowed(self, i: int, j: int) -> bool:
        return all(self.ok[i:j])

    def keep(self, i, j, boundary, output) -> int:
        return (boundary[i] + max(output[j - 1], self.kept_out[j - 1]) + sum(self.kept[i:j])
                - self.kept_out[j - 1])


def _check(saved, boundary, time, output):
    if not (len(saved) == len(boundary) == len(time) == len(output)):
        raise ValueError(f"saved, boundary, time and output must have one entry per unit "
                         f"(got {len(saved)}, {len(boundary)}, {len(time)}, {len(output)})")
    for name, xs in (("saved", saved), ("boundary", boundary), ("time", time), ("output", output)):
        if any(x < 0 for x in xs):
            raise ValueError(f"{name} entries must be non-negative")


def nested_backward(saved, boundary, output, i: int, j: int) -> int:
    """Bytes over the prefix while the nested span [i, j) runs its backward (module doc)."""
    best = run = 0
    for u in range(i, j):
        if u > i:
            run += output[u - 1] + boundary[u]
        best = max(best, run + saved[u])
    return boundary[i] + best


def chain_peak(saved: Sequence[int], boundary: Sequence[int], spans, fixed: int = 0, floor: int = 0,
               output: Sequence[int] | None = None, selective: Selective | None = None,
               selective_spans=(), nested_spans=()) -> int:
    """Predicted peak (bytes) of recomputing `spans` (those in `selective_spans` selectively,
    priced by `selective`; those in `nested_spans` nested) under the model in the module doc."""
    output = output if output is not None else [0] * len(saved)
    sel, nest = set(selective_spans), set(nested_spans)
    if sel and (selective is None or not sel <= set(spans)):
        raise ValueError("selective_spans must be among spans, and need the units' Selective figures")
    if not nest <= set(spans) or nest & sel or any(j - i < 2 for i, j in nest):
        raise ValueError("nested_spans must be among spans, not selective, and hold two units or more")
    starts = {}
    prev_end = 0
    for i, j in sorted(spans):
        if not (0 <= i < j <= len(saved)) or i < prev_end:
            raise ValueError(f"spans must be disjoint, ordered and inside the chain: {spans}")
        prev_end = j
        starts[i] = j
    prefix = 0
    span_peak = 0
    u = 0
    while u < len(saved):
        if u in starts:
            j = starts[u]
            if (u, j) in sel:
                span_peak = max(span_peak, prefix + boundary[u] + sum(saved[u:j]) + sum(selective.extra[u:j]))
                prefix += selective.keep(u, j, boundary, output)
            elif (u, j) in nest:
                span_peak = max(span_peak, prefix + nested_backward(saved, boundary, output, u, j))
                prefix += boundary[u] + output[j - 1]
            else:
                span_peak = max(span_peak, prefix + boundary[u] + sum(saved[u:j]))
                prefix += boundary[u] + output[j - 1]
            u = j
        else:
            prefix += saved[u]
            u += 1
    return max(floor, fixed + prefix, fixed + span_peak if starts else 0)


def chain_frontier(saved: Sequence[int], boundary: Sequence[int], time: Sequence[float], *,
                   fixed: int = 0, floor: int = 0, output: Sequence[int] | None = None,
                   buckets: int = 256, max_caps: int = 24, max_span: int | None = None,
                   selective: Selective | None = None, nested: bool = False,
                   region_s=None) -> list[ChainPlan]:
    """Pareto frontier (extra time ascending, peak descending) of span choices.

    `output`: per unit, bytes still kept when a span ends there (default 0).
    `max_span`: most units one span may hold (None: any).
    `selective`: the units' figures when recomputed selectively; each span is then recomputed
    whole or selectively, whichever the plan needs (None: whole only). `nested`: spans of two
    units or more may also be recomputed nested (module doc). `region_s(i, j, mode)`: seconds
    a span [i, j) recomputed in `mode` (0 whole, 1 selective, 2 nested) adds beyond its
    units' times (None: nothing).
    """
    output = list(output) if output is not None else [0] * len(saved)
    _check(saved, boundary, time, output)
    K = len(saved)
    if selective is not None and any(len(x) != K for x in (selective.kept, selective.kept_out, selective.extra,
                                                            selective.time_saved, selective.ok)):
        raise ValueError("selective figures must have one entry per unit")
    none = ChainPlan((), chain_peak(saved, boundary, (), fixed, floor, output), 0.0)
    if K == 0:
        return [none]
    total = sum(saved) + sum(boundary) + sum(output)
    extra_total = sum(selective.kept) + sum(selective.extra) if selective is not None else 0
    if total == 0:
        return [none]
    delta = max(1.0, total / buckets)
    Q = int(math.ceil((total + extra_total) / delta)) + K + 1
    qs = [int(math.ceil(s / delta)) for s in saved]
    csum = [0]
    for s in saved:
        csum.append(csum[-1] + s)
    tsum = [0.0]
    for t in time:
        tsum.append(tsum[-1] + t)
    span_limit = K if max_span is None else max(1, max_span)

    def options(i, k):
        """{mode: (quantized backward peak over the prefix, quantized keep, seconds)} per way to
        recompute [i, k): 0 whole, 1 selective, 2 nested."""
        whole_keep = int(math.ceil(boundary[i] / delta)) + int(math.ceil(output[k - 1] / delta))
        out = {0: (int(math.ceil((boundary[i] + csum[k] - csum[i]) / delta)), whole_keep, tsum[k] - tsum[i])}
        if selective is not None and selective.allowed(i, k):
            out[1] = (int(math.ceil((boundary[i] + csum[k] - csum[i] + sum(selective.extra[i:k])) / delta)),
                      int(math.ceil(selective.keep(i, k, boundary, output) / delta)),
                      max(0.0, tsum[k] - tsum[i] - sum(selective.time_saved[i:k])))
        if nested and k - i >= 2:
            out[2] = (int(math.ceil(nested_backward(saved, boundary, output, i, k) / delta)), whole_keep,
                      2.0 * (tsum[k] - tsum[i]))
        if region_s is not None:
            out = {mode: (q, keep, secs + region_s(i, k, mode)) for mode, (q, keep, secs) in out.items()}
        return out

    # Caps on the recompute-time peak (quantized, relative to `fixed`): evenly spaced, the same
    # with or without selective spans (which only add options under each cap).
    top = int(math.ceil(total / delta)) + K + 1 + int(math.ceil(sum(saved) / delta)) + 1
    n_caps = min(max_caps, top + 1)
    caps = sorted({int(round(k * top / max(1, n_caps - 1))) for k in range(n_caps)})
    spans_of = {(i, k): options(i, k) for k in range(1, K + 1) for i in range(max(0, k - span_limit), k)}
    plans = [none]
    INF = np.inf
    for capq in caps:
        # g[j][m]: least time covering units [0, j) with quantized memory m.
        g = [np.full(Q, INF) for _ in range(K + 1)]
        back: list[np.ndarray | None] = [None] * (K + 1)   # predecessor choice per cell
        g[0][0] = 0.0
        for k in range(1, K + 1):
            best = np.full(Q, INF)
            # -1: keep unit k-1; mode * (K + 1) + i: span [i, k) recomputed in that mode
            choice = np.full(Q, -1, dtype=np.int64)
            sh = qs[k - 1]
            if sh < Q:
                cand = np.full(Q, INF)
                cand[sh:] = g[k - 1][:Q - sh]
                better = cand < best
                best[better] = cand[better]
                choice[better] = -1
            for i in range(max(0, k - span_limit), k):
                for mode, (qpeak, sh, secs) in spans_of[(i, k)].items():
                    # recomputing [i, k) from prefix m peaks at m + qpeak
                    room = capq - qpeak
                    if room < 0 or sh >= Q:
                        continue
                    src = g[i]
                    if room + 1 < Q:
                        src = src.copy()
                        src[room + 1:] = INF
                    cand = np.full(Q, INF)
                    cand[sh:] = src[:Q - sh] + secs
                    better = cand < best
                    best[better] = cand[better]
                    choice[better] = mode * (K + 1) + i
            g[k] = best
            back[k] = choice
        for m in _useful_cells(g[K]):
            modes = {}
            k, mm = K, int(m)
            while k > 0:
                c = int(back[k][mm])
                if c == -1:
                    mm -= qs[k - 1]
                    k -= 1
                    continue
                mode, i = divmod(c, K + 1)
                modes[(i, k)] = mode
                mm -= spans_of[(i, k)][mode][1]
                k = i
            spans = tuple(sorted(modes))
            sel = tuple(sp for sp in spans if modes[sp] == 1)
            nest = tuple(sp for sp in spans if modes[sp] == 2)
            seconds = sum(spans_of[sp][modes[sp]][2] for sp in spans)
            plans.append(ChainPlan(spans, chain_peak(saved, boundary, spans, fixed, floor, output, selective, sel,
                                                     nest), seconds, sel, nest))
    if selective is not None or nested:
        # the plans recomputing whole spans only, as without selective figures: a selective
        # option taking a cell never hides them
        plans += chain_frontier(saved, boundary, time, fixed=fixed, floor=floor, output=output, buckets=buckets,
                                max_caps=max_caps, max_span=max_span, region_s=region_s)
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
