"""Recompute planning: units of a captured forward, their prices, and the CheckpointPlanner.

How it decides (see docs/checkpointing.md):

1. `analyze_step` prices every node of the captured forward: bytes autograd saves for it
   (`NodeCost.saved_bytes`) and an estimated forward time (`NodeCost.est_time_s`).
2. Segment discovery cuts the forward (graph order) into units: runs of nodes of the same
   module at one depth of the module tree (blocks, attention, MLP); graphs without module
   structure are cut at the output's dominators (networkx), the nodes every path from the
   inputs to the loss passes through. Residual adds and U-Net skips need no special case:
   a unit's inputs are whatever crosses its start, skips included.
3. Each unit gets saved bytes (dropped when recomputed; outputs used after the unit are not
   counted, they stay live), boundary bytes (its inputs that nobody else keeps) and
   recompute time; a solver from memfit.planning.solvers returns the Pareto frontier of plans.
4. The frontier (fastest first) is searched with the one budget search
   (memfit.planning.solvers.first_fit); each plan probed is applied to a copy of the graph and
   the whole step is simulated again (the same fake-tensor cost model, recomputation and
   all). The floor (the most-recomputing plan) is simulated once and is the same for every
   budget: a budget under it is refused with it, a budget over it gets a plan.
5. Regions are outlined (memfit.ir.outline) into child GraphModules called through
   memfit.runtime.checkpoint.CheckpointedRegion (non-reentrant torch.utils.checkpoint with
   RNG replay, buffer updates once per step).

Budgets are for the whole training step's peak, as everywhere in memfit: bytes, "6GiB",
or "50%" of the unoptimized step's predicted peak.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass

import torch
import torch.fx

from memfit.errors import BudgetError, PassError
from memfit.ir.capture import Captured
from memfit.ir.fx_utils import call_nodes, copy_graph_module, module_path
from memfit.ir.outline import checkpoint_region
from memfit.passes.infra.base import Diagnostic
from memfit.planning.solvers.search import first_fit
from memfit.planning.units import (Unit, block_spans, discover_runs, dominator_runs, module_runs,  # noqa: F401
                                   price_units)
from memfit.runtime.checkpoint import node_may_draw_random

log = logging.getLogger(__name__)

SOLVERS = ("auto", "chain", "knapsack")


TIME_MODELS = ("measured", "roofline")


def forward_profile(cap: Captured, time_model: str):
    """The measured forward (memfit.cost_models.timing.cached_profile: measured once per graph,
    shapes and machine, then read back) that prices recompute under `time_model="measured"`; None for "roofline", and where the graph cannot run for real
    (fake or meta inputs or parameters: the torch.compile backend's graphs)."""
    if time_model not in TIME_MODELS:
        raise PassError(f"time_model={time_model!r}: choose 'measured' (a short profile of the forward) or "
                        "'roofline' (nominal rates)")
    if time_model == "roofline":
        return None
    from torch._subclasses.fake_tensor import is_fake

    from memfit.cost_models.timing import cached_profile

    tensors = [t for t in list(cap.flat_inputs()) + list(cap.gm.parameters()) + list(cap.gm.buffers())
               if isinstance(t, torch.Tensor)]
    if any(is_fake(t) or t.device.type == "meta" for t in tensors):
        return None
    return cached_profile(cap)


def region_overhead_of(cap: Captured, profile):
    """What a recomputed region costs beyond its operators on the graph's device
    (memfit.cost_models.overheads.region_overhead: probed once per machine), with a measured
    forward `profile`; None with the roofline (nominal rates) or without a profile."""
    if profile is None:
        return None
    from memfit.cost_models.overheads import region_overhead

    flat = [t for t in list(cap.flat_inputs()) + list(cap.gm.parameters()) if isinstance(t, torch.Tensor)]
    return region_overhead(flat[0].device if flat else torch.device("cpu"))


# ----------------------------------------------------------------------------- rewriting

def apply_spans(gm: torch.fx.GraphModule, units: list[Unit], spans, *, in_place: bool = False,
                fsdp_units=(), selective=(), nested=()):
    """`gm` (a copy of it unless `in_place`) with each span of units [i, j) recomputed:
    its nodes outlined (memfit.ir.outline) into a child run by CheckpointedRegion (selectively
    for the spans in `selective`: memfit.planning.selective; for the spans in `nested`, each
    unit is a region of its own inside the span's region: two-level recompute).
    `fsdp_units` (module paths, Captured.fsdp_units): a span is cut where it would cross from
    one FSDP unit into another, so each region is recomputed inside one unit (memfit.ir.fsdp).
    Returns (graph module, call nodes)."""
    from memfit.ir.fsdp import split_at_units

    new = gm if in_place else copy_graph_module(gm)
    nodes = call_nodes(new)
    made = []
    for k, (i, j) in enumerate(spans):
        region = nodes[units[i].start:units[j - 1].end]
        label = units[i].label if j - i == 1 else f"{units[i].label}..{units[j - 1].label}"
        if (i, j) in nested:
            inner = [checkpoint_region(new, nodes[units[u].start:units[u].end], f"memfit_ckpt_{k}_{u - i}",
                                       units[u].label) for u in range(i, j)]
            region = [m for c in inner for m in [c, *c.users]]
        pieces = split_at_units(region, fsdp_units, module_path)
        for q, piece in enumerate(pieces):
            name = f"memfit_ckpt_{k}" if len(pieces) == 1 else f"memfit_ckpt_{k}_{q}"
            made.append(checkpoint_region(new, piece, name, label, selective=(i, j) in selective))
    return new, made


# ----------------------------------------------------------------------------- planning

@dataclass
class CheckpointPlan:
    """What `plan_checkpoint` chose (or could reach)."""

    gm: torch.fx.GraphModule            # rewritten copy (the original when nothing recomputes)
    spans: tuple                        # unit spans recomputed
    units: list                         # Unit records
    decisions: list                     # memfit.memory_plan.Decision per region
    extra_time_s: float                 # predicted extra step time
    baseline_peak: int                  # predicted peak before
    peak_bytes: int                     # predicted (simulated) peak after
    budget_bytes: int
    diagnostics: list
    verified: int = 0                   # plans simulated to find this one
    selective: tuple = ()               # spans recomputed selectively (matmul outputs kept)
    nested: tuple = ()                  # spans recomputed nested (two levels)


def _phase_figures(analysis) -> tuple[int, int]:
    """(fixed, floor) for the chain model.

    fixed = peak - saved activations: with every activation live at the baseline's peak,
    removing R bytes of saved activations lowers that event by R, so the model reproduces
    the baseline peak exactly when nothing is recomputed. floor = the largest
    non-activation live bytes over the step (gradients at the end of backward, optimizer
    temporaries): what recomputation cannot lower.
    """
    floor = 0
    saved_max = 0
    for _, _phase, live in analysis.timeline:
        floor = max(floor, sum(v for k, v in live.items() if k != "saved_activations"))
        saved_max = max(saved_max, live.get("saved_activations", 0))
    return max(0, analysis.peak_bytes - saved_max), floor


# Fraction of a budget every plan memfit chooses keeps free, for what the cost model does not
# see. Measured errors: returned plans (tools/bench/fit_families.py, tests/test_families.py)
# come out at most 0.002% over their prediction (about 80 bytes of 4 MiB); the same plan
# measured twice on 2 threads differed by 16 KiB on a 1.1 MB step (per-thread kernel scratch
# varies between runs). 0.2% covers the first a hundred times over, and the second on steps
# above 8 MB.
MARGIN = 0.002


def least_budget(peak: int, margin: float = MARGIN) -> int:
    """The smallest budget a plan of predicted `peak` meets, its margin kept free."""
    return int(peak / (1.0 - margin)) + 1


class CheckpointPlanner:
    """Plans for one captured model: analysis, units and frontier computed once, simulated
    plans cached, so sweeping budgets (benchmarks, `memfit plan --budget`) stays cheap.

    `margin`: fraction of the budget kept free for what the cost model does not see
    (MARGIN, the one every rung of the planner keeps). `slack`: plans whose
    chain-model peak exceeds the budget by more than this fraction are not simulated (the
    model is conservative; this bounds the number of simulations). `max_verify`: most
    simulations per budget.
    """

    def __init__(self, cap: Captured, *, optimizer=None, loss_fn=None, solver: str = "auto",
                 max_verify: int = 24, margin: float | None = None, slack: float = 0.15,
                 time_model: str = "measured", selective: bool = True, nested: bool = False):
        from memfit.cost_models.memory import analyze_step
        from memfit.planning import ChainPlan, chain_frontier, knapsack_frontier
        from memfit.planning.selective import selective_figures

        if solver not in SOLVERS:
            raise PassError(f"unknown checkpoint solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        self.cap, self.optimizer, self.loss_fn = cap, optimizer, loss_fn
        self.max_verify, self.margin, self.slack = max_verify, MARGIN if margin is None else margin, slack
        self.profile = forward_profile(cap, time_model)
        self.a0 = analyze_step(cap, optimizer=optimizer, loss_fn=loss_fn, symbolic=False,
                               node_times=self.profile.node_s if self.profile else None)
        self.nodes = call_nodes(cap.gm)
        self.units = price_units(cap.gm, discover_runs(cap.gm, self.nodes))
        self.fixed, self.floor = _phase_figures(self.a0)
        u = self.units
        saved = [x.saved_bytes for x in u]
        boundary = [x.boundary_bytes for x in u]
        outs = [x.output_bytes for x in u]
        times = [x.time_s for x in u]
        self.overhead = region_overhead_of(cap, self.profile)
        self._random = [any(node_may_draw_random(n) for n in self.nodes[x.start:x.end]) for x in u]
        region_s = self.region_s if self.overhead is not None else None
        self.selective, self._whole = None, []
        if solver == "knapsack":
            kf = knapsack_frontier(saved, [b + o for b, o in zip(boundary, outs)],
                                   [t + self.region_s(k, k + 1) for k, t in enumerate(times)],
                                   fixed=self.fixed, floor=self.floor)
            self.frontier = [ChainPlan(tuple((r, r + 1) for r in p.recompute), p.peak_bytes, p.extra_time_s)
                             for p in kf]
        else:
            self.selective = selective_figures(cap.gm, u) if selective else None
            self.frontier = chain_frontier(saved, boundary, times, fixed=self.fixed, floor=self.floor,
                                           output=outs, selective=self.selective,
                                           nested=nested and not cap.fsdp_units,   # FSDP: one level
                                           region_s=region_s)
            if selective or nested or region_s:
                # whole-span plans the joint frontier drops (in the chain model) stay floor
                # candidates; priced without the regions' overhead, which the floor must not
                # depend on (fewer, longer spans are cheaper with it)
                self._whole = chain_frontier(saved, boundary, times, fixed=self.fixed, floor=self.floor,
                                             output=outs)
        self.diagnostics = [Diagnostic("checkpoint", f"unit {x.label} not worth recomputing alone: saves "
                                       f"{x.saved_bytes} B, would keep {x.boundary_bytes + x.output_bytes} B",
                                       node=x.label)
                            for x in u if x.saved_bytes <= x.boundary_bytes + x.output_bytes]
        self._sim: dict = {}      # spans -> (peak bytes, gm)
        self._figures: dict[int, int] = {}   # frontier index -> figure (simulated)
        self._floor: tuple[int, int] | None = None

    def region_s(self, i: int, j: int, mode: int = 0) -> float:
        """Seconds the span of units [i, j) costs as a region (or, nested, as its regions)
        beyond its operators' forward: memfit.cost_models.overheads.RegionOverhead; 0 without
        a measured time model."""
        ov = self.overhead
        if ov is None:
            return 0.0
        units = self.units[i:j]
        ops = sum(x.end - x.start for x in units)
        rand = any(self._random[i:j])
        if mode == 1:
            return ov.seconds(ops, selective=True, random=rand)
        t = ov.seconds(ops, random=rand)
        if mode == 2:
            t += sum(ov.seconds(x.end - x.start, random=r) for x, r in zip(units, self._random[i:j]))
        return t

    # A plan's figure is max(simulated peak, model bounds); all are budget-free, and so is
    # the floor, so refusals and the plans chosen are consistent across budgets.
    def lower_bound(self, p) -> int:
        rec = set(p.recomputed_units())
        u, sel = self.units, set(p.selective)
        outs = [u[j - 1].output_bytes if (i, j) not in sel else
                self.selective.keep(i, j, [x.boundary_bytes for x in u], [x.output_bytes for x in u])
                - u[i].boundary_bytes for i, j in p.spans]
        lb = max(self.floor, self.fixed + sum(x.saved_bytes for k, x in enumerate(u) if k not in rec) + sum(outs))
        return max(lb, int(p.peak_bytes * (1.0 - self.slack)))

    def simulate(self, spans, selective=(), nested=()) -> tuple[int, torch.fx.GraphModule]:
        """(predicted peak, rewritten graph) of recomputing `spans` (those in `selective`
        selectively, those in `nested` nested); cached. The graph is the planner's: rewrite a
        `fresh_graph` instead."""
        if not spans:
            return self.a0.peak_bytes, self.cap.gm
        key = (spans, tuple(selective), tuple(nested))
        if key not in self._sim:
            new = self.fresh_graph(spans, selective, nested)
            self._sim[key] = (self._peak(new), new)
        return self._sim[key]

    def fresh_graph(self, spans, selective=(), nested=()) -> torch.fx.GraphModule:
        """A new copy of the captured graph with `spans` recomputed (for callers that rewrite
        it further, e.g. quantized saves on what stays saved)."""
        return apply_spans(self.cap.gm, self.units, spans, fsdp_units=self.cap.fsdp_units, selective=selective,
                           nested=nested)[0]

    def _peak(self, gm) -> int:
        from memfit.cost_models.memory import analyze_step

        return analyze_step(dataclasses.replace(self.cap, gm=gm), optimizer=self.optimizer,
                            loss_fn=self.loss_fn, symbolic=False).peak_bytes

    def figure(self, i: int) -> int:
        """Frontier plan i's figure: max(simulated peak, its lower bound); cached."""
        if i not in self._figures:
            p = self.frontier[i]
            peak, _ = self.simulate(p.spans, p.selective, p.nested)
            self._figures[i] = max(peak, self.lower_bound(p)) if p.spans else peak
        return self._figures[i]

    def floor_plan(self) -> tuple[int, int]:
        """(frontier index, figure) of the plan with the lowest figure on the frontier: the floor of
        recompute alone, the same for every budget. Branch and bound: plans are simulated in order
        of their lower bounds until the next bound is no lower than the best figure found, so the
        minimum is exact without simulating the whole frontier."""
        if self._floor is None:
            order = sorted(range(len(self.frontier)), key=lambda i: (self._bound(i), -i))
            best = None
            for i in order:
                if best is not None and self._bound(i) >= best[1]:
                    break
                f = self.figure(i)
                if best is None or f < best[1] or (f == best[1] and i < best[0]):
                    best = (i, f)
            self._floor = self._per_block(best)
        return self._floor

    def _per_block(self, best):
        """`best`, or a lower floor among plans the frontier lacks, appended to the frontier as
        its floor: the plan per-block checkpointing makes (each repeated block one region:
        planning/units.block_spans), which the chain model can rank behind plans whose
        simulated steps are higher (12 GPT-2 blocks: 160.9 against 124.5 MiB measured), and the
        whole-span plans that selective or nested spans displaced from the frontier, so those
        options never raise the floor. Branch and bound on their lower bounds, as above."""
        from memfit.planning import ChainPlan, chain_peak

        u = self.units
        have = {p.spans for p in self.frontier if not p.selective and not p.nested}
        cands = [p for p in self._whole if p.spans and p.spans not in have]
        spans = block_spans(u)
        if spans and spans not in have:
            cands.append(ChainPlan(spans, chain_peak([x.saved_bytes for x in u], [x.boundary_bytes for x in u], spans,
                                                     self.fixed, self.floor, [x.output_bytes for x in u]), 0.0))
        found = None
        for p in sorted(cands, key=lambda p: (max(self.floor, int(p.peak_bytes * (1.0 - self.slack))), p.key())):
            if max(self.floor, int(p.peak_bytes * (1.0 - self.slack))) >= (found or best)[1] and p.spans != spans:
                continue
            fig = max(self.simulate(p.spans)[0], self.floor)
            if fig < (found or best)[1]:
                found = (p, fig)
        if found is None:
            return best
        p = found[0]   # priced as its decisions are
        secs = sum(d.extra_time_s for d in self.decisions_for(p.spans))
        self.frontier.append(dataclasses.replace(p, extra_time_s=secs))
        self._figures[len(self.frontier) - 1] = found[1]
        return len(self.frontier) - 1, found[1]

    def _bound(self, i: int) -> int:
        p = self.frontier[i]
        return self.lower_bound(p) if p.spans else self.a0.peak_bytes

    def floor_bytes(self) -> int:
        return self.floor_plan()[1]

    def min_budget_bytes(self) -> int:
        """The smallest budget `plan` meets: the floor plus the margin kept free."""
        return least_budget(self.floor_bytes(), self.margin)

    def decisions_for(self, spans, selective=(), nested=()) -> list:
        from memfit.memory_plan import Decision

        units = self.units
        out = []
        for i, j in spans:
            label = units[i].label if j - i == 1 else f"{units[i].label}..{units[j - 1].label}"
            saved = sum(u.saved_bytes for u in units[i:j]) - units[i].boundary_bytes - units[j - 1].output_bytes
            secs = sum(u.time_s for u in units[i:j])
            detail = f"{units[j - 1].end - units[i].start} nodes"
            mode = 0
            if (i, j) in selective:
                mode = 1
                keep = self.selective.keep(i, j, [u.boundary_bytes for u in units], [u.output_bytes for u in units])
                saved = sum(u.saved_bytes for u in units[i:j]) - keep
                secs = max(0.0, secs - sum(self.selective.time_saved[i:j]))
                detail += "; selective: matmul and attention outputs kept, the rest recomputed"
            elif (i, j) in nested:
                mode = 2
                secs *= 2.0
                detail += f"; nested: each of its {j - i} units a region of its own, recomputed twice"
            secs += self.region_s(i, j, mode)
            out.append(Decision(target=label, action="recompute", saved_bytes=max(0, saved),
                                extra_time_s=secs, detail=detail))
        if out:
            how = ("measured forward times" if self.profile is not None else "roofline on nominal rates") + (
                f"; {self.overhead.note()}" if self.overhead is not None else "")
            if self.profile is not None and self.profile.backward_node_s is not None:
                step = self.profile.step_s()
                extra = sum(d.extra_time_s for d in out)
                how += (f"; the step without recompute predicted {step * 1e3:.2f} ms (forward and backward, "
                        f"measured per node), so {1.0 + extra / step:.2f}x with it" if step > 0 else "")
            out[-1] = dataclasses.replace(out[-1], detail=f"{out[-1].detail}; recompute priced by {how}")
        return out

    def budget_bytes(self, budget) -> int:
        from memfit.budget import Budget

        b = Budget.parse(budget) if budget is not None and budget != "" else None
        return b.resolve(self.a0.peak_bytes) if b is not None else self.a0.peak_bytes

    def plan(self, budget) -> CheckpointPlan:
        """The fastest frontier plan whose simulated figure fits `budget` (memfit.planning.solvers.
        first_fit over the frontier, fastest first); BudgetError with the floor when none does."""
        from memfit.budget import format_bytes

        budget_bytes = self.budget_bytes(budget)
        target = int(budget_bytes * (1.0 - self.margin))
        floor_i, floor_fig = self.floor_plan()
        if floor_fig <= target:
            def probe(i):
                p = self.frontier[i]
                lb = self.lower_bound(p) if p.spans else 0
                return lb if lb > target else self.figure(i)   # over on its bound alone: not simulated

            fit = first_fit(len(self.frontier), probe, target, known=self._figures, floor_index=floor_i,
                            position=[-p.peak_bytes for p in self.frontier], max_evals=self.max_verify)
            p = self.frontier[fit.index]
            peak, new = self.simulate(p.spans, p.selective, p.nested)
            return CheckpointPlan(new, p.spans, self.units, self.decisions_for(p.spans, p.selective, p.nested),
                                  p.extra_time_s, self.a0.peak_bytes, fit.figure, budget_bytes,
                                  list(self.diagnostics), fit.evaluations, p.selective, p.nested)
        floor_bytes = self.floor_bytes()
        acts = sum(u.saved_bytes for u in self.units)
        mb = self.a0.max_batch(target) if self.a0.symbols.get("B") else None
        batch = f" (largest batch predicted to fit without recompute: {mb})" if mb else ""
        raise BudgetError(
            f"checkpointing cannot meet the budget {format_bytes(budget_bytes)}: the lowest predicted "
            f"peak with recomputation is {format_bytes(floor_bytes)} (unoptimized "
            f"{format_bytes(self.a0.peak_bytes)}; at its highest the step holds "
            f"{format_bytes(self.floor)} besides saved activations (parameters, gradients, optimizer "
            f"state, inputs, temporaries), which recompute cannot lower; saved activations "
            f"{format_bytes(acts)}). What would lower it: quantized saved activations (technique "
            f"'quantize'), a smaller batch or sequence{batch}, a lighter optimizer (8-bit states, "
            f"SGD), or a budget of at least {format_bytes(self.min_budget_bytes(), up=True)}.",
            least_budget=self.min_budget_bytes())

    def forced(self, regions: str) -> CheckpointPlan:
        """Recompute every module matching the fnmatch patterns in `regions` (comma-separated)."""
        pats = [p.strip() for p in regions.split(",") if p.strip()]
        found = []
        for depth in range(1, 8):
            for s, e, label in module_runs(self.nodes, depth):
                if any(fnmatch.fnmatchcase(label, p) for p in pats) and \
                        not any(s < fe and fs < e for fs, fe, _ in found):
                    found.append((s, e, label))
        if not found:
            raise PassError(f"checkpoint: no module matches regions={regions!r} "
                            f"(module paths look like {self.units[0].label!r})")
        found.sort()
        units = price_units(self.cap.gm, found)
        spans = tuple((k, k + 1) for k in range(len(units)))
        new = apply_spans(self.cap.gm, units, spans, fsdp_units=self.cap.fsdp_units)[0]
        peak = self._peak(new)
        saved_units, self.units = self.units, units
        try:
            dec = self.decisions_for(spans)
        finally:
            self.units = saved_units
        return CheckpointPlan(new, spans, units, dec, sum(d.extra_time_s for d in dec), self.a0.peak_bytes,
                              peak, self.a0.peak_bytes, [], 1)


def plan_checkpoint(cap: Captured, budget, *, optimizer=None, loss_fn=None, solver: str = "auto",
                    regions: str = "", **kw) -> CheckpointPlan:
    """Choose regions to recompute so the step's predicted peak fits `budget`.

    `budget`: bytes, a string ("6GiB", "50%" of the unoptimized predicted peak) or a Budget;
    the whole training step's peak, as everywhere in memfit. `regions`: comma-separated
    fnmatch patterns of module paths to recompute regardless of the budget (the solver is
    then skipped). Other options: see CheckpointPlanner.
    Returns a CheckpointPlan: the rewritten graph (a copy), the decisions (which regions
    recompute, bytes saved, predicted extra time) and the simulated peak.
    Raises BudgetError (with the floor and what would lower it) when no plan fits.
    """
    planner = CheckpointPlanner(cap, optimizer=optimizer, loss_fn=loss_fn, solver=solver, **kw)
    if regions:
        return planner.forced(regions)
    return planner.plan(budget)
