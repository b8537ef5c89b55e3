"""Selective and nested recompute benchmark: memfit's plans at per-block checkpointing's
measured peak, halfway to the unmodified peak, and at memfit's floor, with selective and
nested regions allowed and with one level of whole regions only, side by side with
per-block checkpointing and torch's selective checkpointing per block.

    python tools/bench/selective.py                          # the models below
    python tools/bench/selective.py --models hf_gpt2_12 --repeats 7

For each model: the unmodified step, torch.utils.checkpoint on every block, the same with
torch's selective checkpointing (the matmul and attention outputs memfit's selective regions
keep, memfit.runtime.checkpoint.SAVED_OPERATORS), and memfit's checkpoint planner at three
budgets: per-block checkpointing's measured peak ("equal peak"), halfway between that peak
and the unmodified one ("halfway"), and the planner's own least budget ("floor"), each
planned with every kind of region ("all kinds") and with one level of whole regions only.
Measured peak: memfit.measure (CPU allocator events, no optimizer). Step time: the median
forward + backward over the unmodified step's, the variants alternated in one process
(tools/bench/common.alternated). The models are captured as they are (no structural passes),
so memfit's graph runs the same eager attention as the baselines.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import common  # first: puts the repository root on sys.path
from memfit.budget import format_bytes
from memfit.cost_models.measure import measure
from memfit.errors import BudgetError
from memfit.ir.capture import capture
from memfit.ir.module import OptimizedModule
from memfit.planning.checkpoint import CheckpointPlanner, least_budget


def build(name):
    """(model, inputs, loss_fn, blocks): tools/bench/checkpoint.py's models at d=256, T=256
    (`_12`: 12 layers instead of 4)."""
    from checkpoint import build as build_model
    base, deep, _ = name.partition("_12")
    return build_model(base, d=256, seq_len=256, vocab=2048, image_size=128, layers=12 if deep else 4)


def sac_context():
    import torch.utils.checkpoint as tuc

    from memfit.runtime.checkpoint import saved_operators
    return tuc.create_selective_checkpoint_contexts(sorted(saved_operators(), key=str))


def run_model(name, repeats):
    torch.manual_seed(0)
    model, inputs, loss_fn, blocks = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    base = measure(model, example_inputs=inputs, loss_fn=loss_fn)
    perblock = {"per block": common.PerBlock(blocks), "per block, torch SAC": common.PerBlock(blocks, sac_context)}
    peaks = {}
    for k, pb in perblock.items():
        with pb.active():
            peaks[k] = measure(model, example_inputs=inputs, loss_fn=loss_fn).peak_bytes
    cap = capture(model, inputs, dynamic=False)
    t0 = time.perf_counter()
    planners = {"all kinds": CheckpointPlanner(cap, loss_fn=loss_fn, nested=True),
                "one level, whole": CheckpointPlanner(cap, loss_fn=loss_fn, selective=False, nested=False)}
    t_plan = time.perf_counter() - t0
    budgets = {"equal peak": least_budget(peaks["per block"]),
               "halfway": (peaks["per block"] + base.peak_bytes) // 2}
    variants, rows = {}, []
    for bname, budget in list(budgets.items()) + [("floor", None)]:
        for pname, planner in planners.items():
            budget = planner.min_budget_bytes() if bname == "floor" else budget
            key = f"memfit {bname}, {pname}"
            try:
                plan = planner.plan(budget)
            except BudgetError as e:
                rows.append([key, format_bytes(budget), "-", f"BudgetError (least {format_bytes(e.least_budget)})",
                             "-", "-", "-"])
                continue
            om = OptimizedModule(model, cap, plan.gm)
            m = measure(om, example_inputs=inputs, loss_fn=loss_fn)
            variants[key] = om
            rows.append([key, format_bytes(budget), format_bytes(plan.peak_bytes), format_bytes(m.peak_bytes),
                         key, f"{len(plan.spans)} ({len(plan.selective)} selective, {len(plan.nested)} nested)",
                         f"{plan.extra_time_s * 1e3:.1f}"])
    runs = {"unmodified": functools.partial(common.step_time, model, inputs, loss_fn, params)}
    for k, pb in perblock.items():
        def step(pb=pb):
            with pb.active():
                return common.step_time(model, inputs, loss_fn, params)
        runs[k] = step
    for k, om in variants.items():
        runs[k] = functools.partial(common.step_time, om, inputs, loss_fn, params)
    timing = common.alternated(runs, repeats)
    ratio = timing.ratio
    cells = [["unmodified", "-", "-", format_bytes(base.peak_bytes), "1.00", "-", "-"]]
    for k in perblock:
        cells.append([f"torch.utils.checkpoint {k} ({len(blocks)})", "-", "-", format_bytes(peaks[k]),
                      f"{ratio[k]:.2f}", len(blocks), "-"])
    for r in rows:
        if r[4] in ratio:
            r[4] = f"{ratio[r[4]]:.2f}"
        cells.append(r)
    head = (f"\n### {name}: unmodified peak {format_bytes(base.peak_bytes)}, step "
            f"{timing.median['unmodified'] * 1e3:.1f} ms (both planners: {t_plan:.1f} s)\n")
    return head + "\n" + common.table(["variant", "budget", "predicted peak", "measured peak", "step time ratio",
                                       "regions", "predicted extra ms"], cells)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2_like,hf_gpt2,hf_bert,hf_vit,hf_gpt2_12")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(common.machine())
    for name in args.models.split(","):
        print(run_model(name, args.repeats), flush=True)


if __name__ == "__main__":
    main()
