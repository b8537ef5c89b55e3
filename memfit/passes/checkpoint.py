"""The `checkpoint` pass: recompute chosen regions in backward so the step fits a byte budget.

The planning (units, pricing, the frontier search, the floor) is memfit.planning.checkpoint;
this pass runs it on the graph it is given and applies the chosen regions in place. Its
names are re-exported here, where earlier code and docs import them from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx

from memfit.errors import PassError
from memfit.ir.fx_utils import call_nodes  # noqa: F401 - re-exported
from memfit.passes.infra.base import Diagnostic, Pass, PassContext, PassResult
from memfit.passes.infra.registry import register_pass
from memfit.planning.checkpoint import (SOLVERS, CheckpointPlan, CheckpointPlanner, Unit,  # noqa: F401
                                        apply_spans, discover_runs, dominator_runs, module_runs,
                                        plan_checkpoint, price_units)


# ----------------------------------------------------------------------------- the pass

@register_pass
@dataclass(frozen=True)
class Checkpoint(Pass):
    """Recompute regions in backward (exact) so the step's predicted peak fits a budget.

    budget: bytes ("123456"), a size ("6GiB", "800MB") or a percentage ("50%") of the
    unoptimized step's predicted peak; "" takes the budget from the PassContext.
    solver: "auto" (chain DP), "chain" or "knapsack". regions: comma-separated module path
    patterns (fnmatch, e.g. "h.*") to recompute regardless of the budget. selective: the chain
    solver may recompute a region selectively (its matmul and attention outputs kept, the rest
    recomputed: memfit.planning.selective); False recomputes regions whole. nested: spans may
    also be two levels of regions (opt-in: docs/checkpointing.md).
    """

    name: ClassVar[str] = "checkpoint"
    budget: str = ""
    solver: str = "auto"
    regions: str = ""
    selective: bool = True
    nested: bool = False

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise PassError(f"unknown checkpoint solver {self.solver!r}; choose one of {', '.join(SOLVERS)}")

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        budget: Any = self.budget or ctx.budget
        if budget is None and not self.regions:
            return PassResult(gm, modified=False, diagnostics=[Diagnostic(
                "checkpoint", "no budget given (option budget= or the context's budget) and no "
                "regions forced: nothing to do")])
        if ctx.captured is None:
            raise PassError("checkpoint needs the captured model in the PassContext (example inputs)")
        cap = dataclasses.replace(ctx.captured, gm=gm)
        plan = plan_checkpoint(cap, budget, optimizer=ctx.optimizer, loss_fn=ctx.loss_fn,
                               solver=self.solver, regions=self.regions, selective=self.selective,
                               nested=self.nested)
        if plan.spans:
            apply_spans(gm, plan.units, plan.spans, in_place=True,   # the plan was simulated on a copy
                        fsdp_units=cap.fsdp_units, selective=plan.selective, nested=plan.nested)
        nodes = sum(units_nodes(plan.units, i, j) for i, j in plan.spans)
        return PassResult(gm, modified=bool(plan.spans),
                          stats={"regions": len(plan.spans), "selective": len(plan.selective),
                                 "nested": len(plan.nested), "nodes_recomputed": nodes},
                          diagnostics=plan.diagnostics, decisions=list(plan.decisions))


def units_nodes(units, i, j) -> int:
    return units[j - 1].end - units[i].start
