"""Budget solvers: pure functions over plain lists of bytes and seconds (no torch).

- `chain`: a chain of segments (units in forward order); recompute spans of consecutive
  units (rotor/Rockmate-style dynamic program over a simple, conservative peak model).
- `knapsack`: independent regions of a general graph, each recomputed or kept.

Both return the Pareto frontier of plans (extra time ascending, predicted peak
descending) and pick from it with `pick`, so a lower budget never gives a higher
predicted peak (the frontier does not depend on the budget).
"""

from memfit.planning.solvers.chain import ChainPlan, Selective, chain_frontier, chain_peak, solve_chain
from memfit.planning.solvers.knapsack import KnapsackPlan, knapsack_frontier, knapsack_peak, solve_knapsack
from memfit.planning.solvers.frontier import pareto, pick

__all__ = ["ChainPlan", "Selective", "chain_frontier", "chain_peak", "solve_chain", "KnapsackPlan",
           "knapsack_frontier", "knapsack_peak", "solve_knapsack", "pareto", "pick"]
