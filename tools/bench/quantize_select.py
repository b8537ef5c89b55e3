"""Benchmark: quantizing every eligible saved tensor vs the shortest prefix that meets the budget.

    python tools/bench/quantize_select.py [--repeats 7]

On examples/gpt2_like.py make() at a small size (no dropout), SGD, techniques=["quantize"]
(so that quantization, not recompute, has to meet the budget): for budgets between the
all-8-bit predicted peak and the unquantized one, `memfit.optimize` (selection) against the
pipeline `quantize-activations` (all eligible tensors, what optimize did before). Prints
tensors quantized, predicted and measured peaks, step time (forward + backward, medians of
alternating runs, one process) and planning time, as a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import re
import time

import torch

import common  # first: puts the repository root on sys.path
import memfit
from examples import gpt2_like as gpt

SIZE = dict(batch_size=8, seq_len=64, layers=2, d=64, heads=4, vocab=128, dropout=0.0)
OPT = "sgd"


def _nodes(om) -> int:
    """Nodes the pass wrapped (the chosen prefix plus nodes saving the same storages)."""
    rt = getattr(om.graph_module, "memfit_quant", None)
    return 0 if rt is None else sum(1 for _ in rt.children())


def _tensors(om) -> int:
    """Saved tensors quantized, from the plan's decisions."""
    for d in om.memfit_plan.decisions:
        if d.target == "quantize-activations" and d.action == "tensors":  # explicit pipeline
            return int(d.detail)
        m = re.match(r"(\d+)-bit on (?:all )?(\d+)", d.detail)
        if d.action.startswith("quantize-activations") and m:
            return int(m.group(2))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--fractions", default="0.75,0.5,0.25",
                    help="budgets: all-8-bit peak + f x (unquantized peak - all-8-bit peak)")
    ap.add_argument("--batch", type=int, default=SIZE["batch_size"])
    ap.add_argument("--seq", type=int, default=SIZE["seq_len"])
    args = ap.parse_args(argv)
    size = dict(SIZE, batch_size=args.batch, seq_len=args.seq)
    torch.manual_seed(0)
    model, inputs = gpt.make(**size)
    kw = dict(example_inputs=inputs, optimizer=OPT, loss_fn=gpt.loss_fn)

    t0 = time.perf_counter()
    every = memfit.optimize(model, None, passes="quantize-activations", **kw)
    t_all = time.perf_counter() - t0
    base = memfit.plan(model, symbolic=False, **kw).peak_bytes
    variants = [("unquantized", model, None, base, 0.0),
                ("all eligible (before)", every, None, every.memfit_plan.peak_bytes, t_all)]
    for f in (float(x) for x in args.fractions.split(",")):
        budget = int(every.memfit_plan.peak_bytes + f * (base - every.memfit_plan.peak_bytes))
        t0 = time.perf_counter()
        om = memfit.optimize(model, budget, techniques=["quantize"], **kw)
        variants.append((f"selected (after), budget {budget} B", om, budget, om.memfit_plan.peak_bytes,
                         time.perf_counter() - t0))

    measured = {name: memfit.measure(m, **kw).peak_bytes for name, m, *_ in variants}
    timing = common.alternated({name: functools.partial(common.step_time, m, inputs, gpt.loss_fn)
                                for name, m, *_ in variants}, args.repeats, warmup=1)
    eligible, eligible_nodes = _tensors(every), _nodes(every)
    print(f"gpt2_like {size}, SGD, {args.repeats} repeats; {common.machine()}")
    print()
    print(common.table(["variant", "tensors quantized", "nodes wrapped", "predicted peak", "measured peak",
                        "within budget", "step time", "vs unquantized", "planning"]))
    for name, m, budget, pred, plan_s in variants:
        med = timing.median[name]
        t, n = (_tensors(m), _nodes(m)) if m is not model else (0, 0)
        ok = "-" if budget is None else ("yes" if measured[name] <= budget else "NO")
        print(common.row([name, f"{t} of {eligible}", f"{n} of {eligible_nodes}", f"{pred} B", f"{measured[name]} B",
                          ok, f"{med * 1e3:.1f} ms", f"{timing.ratio[name]:.2f}x", f"{plan_s:.1f} s"]))
    for name, m, budget, *_ in variants[2:]:
        for d in m.memfit_plan.decisions:
            print(f"\n{name}: {d.action}: {d.detail}; predicted extra time {d.extra_time_s * 1e6:.0f} us")


if __name__ == "__main__":
    main()
