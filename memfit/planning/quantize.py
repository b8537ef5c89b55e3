"""Which saved tensors to quantize: the shortest ranked prefix that meets a budget.

`memfit.optimize` used to wrap every eligible saved tensor in 8 bits once recompute alone
could not reach the budget. That costs time for every tensor wrapped (on CPU the reference
kernels are about a dozen torch ops per tensor; on any device the bytes moved) and adds
gradient error where none is needed. `select_quantized` instead:

1. prices the candidates (`memfit.passes.quantize.price_candidates`) and ranks the nodes
   that save them (`rank_nodes`): most bytes saved first;
2. simulates 8 bits on all of them (`analyze_step`); if that is over the budget, this graph
   cannot be met at these bits and the caller moves on;
3. else searches the prefix length (`shortest_prefix`): each probe interpolates the peak
   linearly in the bytes saved between the known bounds (falling back to bisection), at
   most `max_sims` simulations in all (the "all" one included). The peak is not linear in the bytes saved
   (it may sit in backward, after some saved tensors are freed), so every probe is a full
   simulation of the rewritten step and the chosen prefix always fits as predicted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable


def rank_nodes(candidates) -> list[str]:
    """Node names, most bytes saved first (ties: more bytes per predicted second, then name).

    Why bytes saved and not bytes per second: `price_candidates` prices a tensor by the bytes
    its quantize/dequantize kernels move, which grow linearly with its size, so bytes saved
    per predicted second is nearly the same for every tensor (it differs by about 20% between
    head-wise and per-row ranges, and for tensors so small that the packed ranges matter).
    Any set that saves X bytes then costs about the same predicted time, and the largest
    tensors first reach X with the fewest tensors: fewest sites of quantization error and
    the least per-tensor overhead (which the bandwidth model leaves out and which dominates
    the CPU reference kernels).
    """
    saved: dict[str, int] = {}
    secs: dict[str, float] = {}
    for c in candidates:
        saved[c.node] = saved.get(c.node, 0) + c.bytes_saved
        secs[c.node] = secs.get(c.node, 0.0) + c.time_cost_s
    return sorted(saved, key=lambda n: (-saved[n], -saved[n] / max(secs[n], 1e-12), n))


def shortest_prefix(cum: list, budget: int, peak_at: Callable[[int], int], peak_none: int, peak_all: int,
                    *, max_sims: int = 5) -> tuple[int, bool, int]:
    """Shortest k in 1..n (n = len(cum) - 1) with peak_at(k) <= budget, given that the
    prefix of length 0 (peak `peak_none`) is over the budget and the whole list (`peak_all`)
    is not. cum[k]: bytes saved by the first k, ascending.

    Each probe interpolates the peak linearly in the bytes saved between the two known
    bounds (regula falsi), kept to the middle third of the bracket; after two probes moving
    the same bound it bisects instead, so a bent curve cannot stall it. At most `max_sims`
    calls of peak_at. Returns (k, minimal, calls): minimal is True when the prefix k - 1 is
    known over the budget (k == 1, or k - 1 was probed), i.e. dropping the last chosen one
    no longer fits. The peak is not monotone in k in general (a dequantized copy can raise a
    backward peak), but the k returned was checked (or is n).
    """
    n = len(cum) - 1
    lo, hi, plo, phi = 0, n, peak_none, peak_all
    calls, last, same = 0, None, 0
    while hi - lo > 1 and calls < max_sims:
        if same >= 2 or plo <= phi:
            k = (lo + hi) // 2
        else:
            x = cum[lo] + (plo - budget) / (plo - phi) * (cum[hi] - cum[lo])
            k = next((i for i in range(lo + 1, hi) if cum[i] >= x), hi - 1)
            q = -(-(hi - lo) // 3)  # keep to the middle third: the bracket shrinks by a third at least
            k = min(max(k, lo + q), hi - q)
        calls += 1
        p = peak_at(k)
        side = "hi" if p <= budget else "lo"
        if side == "hi":
            hi, phi = k, p
        else:
            lo, plo = k, p
        same = same + 1 if side == last else 1
        last = side
    return hi, hi - lo == 1, calls


@dataclass
class QuantChoice:
    """What select_quantized found for one graph."""

    fits: bool
    peak: int                 # predicted peak of the returned graph (or of "all" when nothing fits)
    gm: object = None         # the rewritten graph (None when nothing fits)
    bits: int = 8
    nodes: tuple = ()         # node names chosen, ranked order
    eligible_nodes: int = 0
    tensors: int = 0          # saved tensors quantized (the pass's count)
    wrapped: int = 0          # nodes the pass wrapped: `nodes` plus those saving the same storages
    eligible_tensors: int = 0
    extra_time_s: float = 0.0  # sum of the chosen candidates' predicted times
    minimal: bool = False     # the prefix one shorter was simulated over budget
    simulations: int = 0

    def detail(self, show: int = 5) -> str:
        names = ", ".join(self.nodes[:show])
        if len(self.nodes) > show:
            names += f" and {len(self.nodes) - show} more"
        if self.nodes and len(self.nodes) == self.eligible_nodes:
            which = f"all {self.tensors} eligible saved tensors ({self.eligible_nodes} nodes)"
        else:
            extra = self.wrapped - len(self.nodes)
            also = f", +{extra} saving the same storages" if extra > 0 else ""
            which = (f"{self.tensors} of {self.eligible_tensors} eligible saved tensors "
                     f"({len(self.nodes)} of {self.eligible_nodes} nodes: {names}{also})")
        how = ("shortest prefix by bytes saved" if self.minimal
               else "a fitting prefix by bytes saved (search capped)")
        if self.nodes and len(self.nodes) == self.eligible_nodes and self.minimal:
            how = "fewer do not fit"
        return f"{self.bits}-bit on {which}; {how}, {self.simulations} simulations"


def select_quantized(q, fresh: Callable, budget_bytes: int, peak_before: int, cap, pass_ctx: Callable,
                     optimizer=None, loss_fn=None, *, verify: bool = False, max_sims: int = 6) -> QuantChoice:
    """The shortest ranked prefix of saved tensors whose quantization by pass `q` (a
    QuantizeActivations) brings the predicted step peak to `budget_bytes` or below.

    fresh(): a new graph to rewrite (the pass rewrites in place); pass_ctx(g): the
    PassContext for graph g; peak_before: the predicted peak of fresh() unquantized (over the
    budget). At most `max_sims` rewrites + analyze_step, the first with every candidate.
    """
    from memfit.cost_models.memory import analyze_step
    from memfit.passes import PassManager
    from memfit.passes.quantize import price_candidates

    def trial(nodes=None):
        g = fresh()
        if nodes is None:
            cands = price_candidates(g, pass_ctx(g), q.config())
        p = q if nodes is None else dataclasses.replace(q, nodes=tuple(nodes))
        res = PassManager([p], verify=verify).run(g, pass_ctx(g))
        a = analyze_step(dataclasses.replace(cap, gm=res.gm), optimizer=optimizer, loss_fn=loss_fn,
                         symbolic=False)
        out = dict(res=res, peak=a.peak_bytes)
        if nodes is None:
            out["cands"] = cands
        return out

    every = trial()
    res = every["res"]
    cands = every["cands"]
    order = rank_nodes(cands)
    name = q.name
    base = dict(bits=q.bits, eligible_nodes=len(order), eligible_tensors=len(cands))
    if every["peak"] > budget_bytes or not res.modified:
        return QuantChoice(False, every["peak"], simulations=1, **base)

    best = {len(order): every}

    def peak_at(k):
        best[k] = trial(order[:k])
        return best[k]["peak"]

    saved_by_node: dict[str, int] = {}
    for c in cands:
        saved_by_node[c.node] = saved_by_node.get(c.node, 0) + c.bytes_saved
    cum = [0]
    for nm in order:
        cum.append(cum[-1] + saved_by_node[nm])
    k, minimal, calls = shortest_prefix(cum, budget_bytes, peak_at, peak_before, every["peak"],
                                        max_sims=max_sims - 1)
    chosen = best[k]
    res = chosen["res"]
    stats = res.stats
    return QuantChoice(True, chosen["peak"], res.gm, nodes=tuple(order[:k]),
                       tensors=int(stats.get(f"{name}.tensors", 0)), wrapped=int(stats.get(f"{name}.nodes", 0)),
                       extra_time_s=float(stats.get(f"{name}.extra_time_us", 0)) * 1e-6,
                       minimal=minimal, simulations=1 + calls, **base)
