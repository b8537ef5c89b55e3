"""Quantized saved tensors: one pricing, one ranking and one prefix search, shared by the eager
path (memfit.optimize: the `quantize-activations` pass) and the torch.compile backend
(memfit.compile.quantized_saves). Which tensors are eligible is decided by the runtime's
gate, memfit.runtime.quantized_save.skip_reason, on both roads.

- price: `quant_time_s` (bytes the quantize and dequantize kernels move, over bandwidth,
  times the kernels' traffic factor);
- rank: `rank` (most bytes saved first; ties: more bytes per second, then name);
- choose: the shortest ranked prefix that meets the budget, found with the one budget
  search (memfit.planning.solvers.first_fit): `choose_prefix` where the saving is exact and
  additive (the backend's saved bytes), `select_quantized` where each prefix is priced by a
  whole simulated step (the eager path: the peak is not linear in the bytes saved, it may
  sit in backward after some saved tensors are freed).

Why bytes saved first and not bytes per second: the time a tensor costs grows linearly with
its size, so bytes per predicted second is nearly the same for every tensor (about 20%
apart between head-wise and per-row ranges, more only for tiny tensors). Any set that saves
X bytes then costs about the same predicted time, and the largest tensors first reach X with
the fewest tensors: fewest sites of quantization error and the least per-tensor overhead
(which the bandwidth model leaves out and which dominates the CPU reference kernels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from memfit.planning.solvers.search import first_fit


def quant_time_s(nbytes: int, packed: int, *, bytes_per_s: float, factor: float = 1.0,
                 extra_read: bool = False) -> float:
    """Seconds to quantize a saved tensor of `nbytes` to `packed` bytes and dequantize it back:
    quantize reads the tensor and writes the packed form, dequantize reads the packed form and
    writes the tensor; per-channel (head-wise or running) ranges read the tensor once more.
    `factor`: memfit.kernels.dispatch.traffic_factor (1 for Triton, more for the torch reference)."""
    moved = 2 * (nbytes + packed) + (nbytes if extra_read else 0)
    return factor * moved / bytes_per_s


def rank(items) -> list[str]:
    """Names of `items` ((name, bytes_saved, seconds) triples; a name may repeat and is
    summed), most bytes saved first; ties: more bytes per second, then name."""
    saved: dict[str, int] = {}
    secs: dict[str, float] = {}
    for name, b, t in items:
        saved[name] = saved.get(name, 0) + b
        secs[name] = secs.get(name, 0.0) + t
    return sorted(saved, key=lambda n: (-saved[n], -saved[n] / max(secs[n], 1e-12), n))


def choose_prefix(items, excess: int | None) -> list[str]:
    """The shortest prefix of `rank(items)` whose savings cover `excess` bytes (all of them
    when `excess` is None, or when even all do not)."""
    order = rank(items)
    if excess is None or not order:
        return order
    saved: dict[str, int] = {}
    for name, b, _ in items:
        saved[name] = saved.get(name, 0) + b
    cum = [0]
    for n in order:
        cum.append(cum[-1] + saved[n])
    fit = first_fit(len(cum), lambda k: excess - cum[k], 0, known={0: excess}, position=cum, max_evals=len(cum))
    return order[:fit.index if fit.index is not None else len(order)]


def rank_nodes(candidates) -> list[str]:
    """Node names of QuantCandidates (memfit.passes.quantize.price_candidates), ranked by `rank`."""
    return rank((c.node, c.bytes_saved, c.time_cost_s) for c in candidates)


def shortest_prefix(cum: list, budget: int, peak_at: Callable[[int], int], peak_none: int, peak_all: int,
                    *, max_sims: int = 5) -> tuple[int, bool, int]:
    """Shortest k in 1..n (n = len(cum) - 1) with peak_at(k) <= budget, given that the prefix
    of length 0 (peak `peak_none`) is over the budget and the whole list (`peak_all`) is not;
    cum[k]: bytes saved by the first k, ascending. The one budget search (first_fit) with the
    cumulative bytes as positions, at most `max_sims` calls of peak_at. Returns (k, minimal,
    calls): minimal is True when the prefix k - 1 is known over the budget. The peak is not
    monotone in k in general (a dequantized copy can raise a backward peak), but the k
    returned was checked (or is n)."""
    n = len(cum) - 1
    fit = first_fit(n + 1, peak_at, budget, known={0: peak_none, n: peak_all}, position=cum, max_evals=max_sims)
    return fit.index, fit.exact, fit.evaluations


@dataclass
class QuantChoice:
    """What select_quantized found for one graph."""

    fits: bool
    peak: int                 # predicted peak of the returned graph (or of "all" when nothing fits)
    gm: object = None         # the rewritten graph (None when nothing fits)
    how: str = "8-bit"        # what is done to the chosen tensors: "8-bit", ..., "offloaded"
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
        return f"{self.how} {'on ' if self.how.endswith('-bit') else ''}{which}; {how}, {self.simulations} simulations"


def select_quantized(q, fresh: Callable, budget_bytes: int, peak_before: int, cap, pass_ctx: Callable,
                     optimizer=None, loss_fn=None, *, verify: bool = False, max_sims: int = 6) -> QuantChoice:
    """The shortest ranked prefix of saved tensors whose rewriting by pass `q` (a
    QuantizeActivations, or an OffloadActivations: the same `price`, `nodes` and stats) brings
    the predicted step peak to `budget_bytes` or below.

    fresh(): a new graph to rewrite (the pass rewrites in place; `q.price(g, ctx)` prices its
    candidates, memfit.passes.quantize.price_candidates); pass_ctx(g): the
    PassContext for graph g; peak_before: the predicted peak of fresh() unquantized (over the
    budget: ValueError otherwise). At most `max_sims` rewrites + analyze_step, the first with every candidate.
    """
    from memfit.cost_models.memory import analyze_step
    from memfit.passes.infra.manager import PassManager

    if peak_before <= budget_bytes:
        raise ValueError(f"select_quantized: the graph fits ({peak_before} <= {budget_bytes} B) before any rewrite")

    def trial(nodes=None):
        g = fresh()
        if nodes is None:
            cands = q.price(g, pass_ctx(g))
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
    base = dict(how=f"{q.bits}-bit" if hasattr(q, "bits") else q.label, eligible_nodes=len(order), eligible_tensors=len(cands))
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
