"""Planning time for GPT-2-small dims (12 layers, d=768, 12 heads, B=8, T=1024).

Everything runs on the meta device and FakeTensors: no weights are initialized and no
activation memory is taken, so this measures the planner alone. Reports the median of
`--repeat` runs, for a symbolic plan (B and T as sympy symbols) and a static one.

    python tools/bench/plan_speed.py [--repeat 3] [--model hf|example|both]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import common  # first: puts the repository root on sys.path
from memfit.api import plan_captured
from memfit.ir.capture import capture


def hf_gpt2_small():
    import transformers
    cfg = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, use_cache=False)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg)
    return "transformers GPT2LMHeadModel", model, (torch.zeros(8, 1024, dtype=torch.long, device="meta"),)


def example_gpt2_small():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpt2_like", os.path.join(common.ROOT, "examples", "gpt2_like.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with torch.device("meta"):
        model, inputs = mod.gpt2_small(batch_size=8)
    inputs = tuple(t.to("meta") for t in inputs)
    return "examples/gpt2_like.py gpt2_small", model, inputs


def time_once(model, inputs, symbolic):
    # Not common.step_time: no training step runs here, capture and the simulated step are
    # timed apart, and the table gives seconds, not ratios to a variant run alongside.
    t0 = time.perf_counter()
    cap = capture(model, inputs, dynamic=symbolic)
    t1 = time.perf_counter()
    plan = plan_captured(cap, None, optimizer="adamw", symbolic=symbolic)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, plan


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", choices=["hf", "example", "both"], default="both")
    args = ap.parse_args()
    builders = {"hf": [hf_gpt2_small], "example": [example_gpt2_small],
                "both": [hf_gpt2_small, example_gpt2_small]}[args.model]
    print(f"machine: {common.machine()}")
    print(common.table(["model", "shapes", "capture s", "simulate s", "total s", "predicted peak",
                        "saved activations"]))
    for build in builders:
        name, model, inputs = build()
        for symbolic in (True, False):
            runs = [time_once(model, inputs, symbolic) for _ in range(args.repeat)]
            cap_s = statistics.median(r[0] for r in runs)
            sim_s = statistics.median(r[1] for r in runs)
            tot = statistics.median(r[0] + r[1] for r in runs)
            plan = runs[-1][2]
            print(common.row([name, "symbolic B, T" if symbolic else "static", f"{cap_s:.2f}", f"{sim_s:.2f}",
                              f"{tot:.2f}", f"{plan.peak_bytes / 2**30:.2f} GiB",
                              f"{plan.categories['saved_activations'] / 2**30:.2f} GiB"]))
            if symbolic:
                print(common.row(["", f"peak(B, T) = {plan.peak_expr}", "", "", "", "", ""]))


if __name__ == "__main__":
    main()
