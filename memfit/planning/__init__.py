"""Planning: what to keep, recompute or quantize so one training step fits a budget.

- `solvers/`: pure functions over plain lists of bytes and seconds (no torch): the chain DP,
  the knapsack, the Pareto frontier and the one budget search (`first_fit`).
- `checkpoint`: recompute units of a captured graph, their pricing and the CheckpointPlanner.
- `quantize`: which saved tensors to quantize (eligibility, pricing and ranking shared by the
  eager path and the torch.compile backend).
- `strategy`: the planner `memfit.optimize` calls: recompute first, quantized saves only
  where recompute alone cannot meet the budget.

Importing this package imports only the pure solvers.
"""

from memfit.planning.solvers import (ChainPlan, KnapsackPlan, Selective, chain_frontier, chain_peak, knapsack_frontier,
                                     knapsack_peak, pareto, pick, solve_chain, solve_knapsack)

__all__ = ["ChainPlan", "Selective", "chain_frontier", "chain_peak", "solve_chain", "KnapsackPlan",
           "knapsack_frontier", "knapsack_peak", "solve_knapsack", "pareto", "pick"]
