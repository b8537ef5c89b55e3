"""Every returned plan within its budget when measured, over examples/hf_families.py.

    python tools/bench/fit_families.py [--budgets 80,60] [--only t5,bart] [--threads N]

For each family and budget: memfit.optimize (AdamW by name, the model's own loss from
labels=), then one measured step of the optimized module. Prints a markdown table (budget,
predicted, measured, prediction error, what the plan used, planning time) and, at the end,
how many plans were returned, how many were refused, and the largest measured excess over a
budget (0 when every plan held). A refusal is not a failure: it states the least budget that
would plan.
"""

from __future__ import annotations

import argparse
import time

import torch

import common  # first: puts the repository root on sys.path
import memfit
from memfit.budget import format_bytes as fb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="80,60", help="comma-separated percentages")
    ap.add_argument("--only", default="", help="comma-separated family names")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from examples import hf_families

    names = [n for n in hf_families.FAMILIES if not args.only or n in args.only.split(",")]
    print(f"machine: {common.machine()}; {torch.get_num_threads()} threads; optimizer adamw")
    print(common.table(["model", "budget", "budget bytes", "predicted", "measured", "error", "plan", "planning"]))
    returned = refused = 0
    worst_over, worst_err = 0, 0.0
    for name in names:
        for pct in args.budgets.split(","):
            torch.manual_seed(0)
            model, inputs, kwargs = getattr(hf_families, name)()
            kw = dict(example_inputs=inputs, example_kwargs=kwargs, optimizer="adamw")
            t0 = time.perf_counter()
            try:
                om = memfit.optimize(model, f"{pct}%", **kw)
            except memfit.BudgetError as e:
                refused += 1
                least = fb(e.least_budget, up=True) if e.least_budget else "?"
                print(common.row([name, f"{pct}%", "", "", "", "", f"refused (least budget {least})",
                                  f"{time.perf_counter() - t0:.1f} s"]), flush=True)
                continue
            dt = time.perf_counter() - t0
            plan = om.memfit_plan
            m = memfit.measure(om, **kw)
            returned += 1
            err = (plan.peak_bytes - m.peak_bytes) / m.peak_bytes
            worst_err = max(worst_err, abs(err))
            worst_over = max(worst_over, m.peak_bytes - plan.budget_bytes)
            used = ", ".join(dict.fromkeys(d.action for d in plan.decisions)) or "nothing"
            over = "" if m.peak_bytes <= plan.budget_bytes else " OVER"
            print(common.row([name, f"{pct}%", fb(plan.budget_bytes), fb(plan.peak_bytes), fb(m.peak_bytes) + over,
                              f"{err:+.3%}", used, f"{dt:.1f} s"]), flush=True)
    print(f"\n{returned} plans returned, {refused} refused; largest measured excess over a budget: "
          f"{max(0, worst_over)} bytes; largest prediction error of a returned plan: {worst_err:.3%}")


if __name__ == "__main__":
    main()
