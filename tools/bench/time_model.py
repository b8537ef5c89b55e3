"""Predicted against measured step time of recompute plans, measured and roofline time models.

    python tools/bench/time_model.py [--models gpt2_like,vit_like] [--fractions 0.7,0.5,0.3]
    python tools/bench/time_model.py --models families      # the 15 of examples/hf_families.py

Per model and budget, memfit.optimize(techniques="checkpoint") plans twice: with
time_model="measured" (recompute priced by a profile of the forward,
memfit.cost_models.timing) and with "roofline" (nominal rates). For each plan:
- predicted ratio: 1 + the plan's predicted extra time / the predicted unmodified step
  (forward + backward as the benchmarks time it, no optimizer step: with "measured", the
  profile's forward and backward per node, timing.ForwardProfile.step_s; with "roofline",
  its forward and a backward twice as long, timing.step_time_s);
- measured ratio: the plan's step time over the unmodified step's, medians of alternated
  repeats in one process (tools/bench/common.py);
- the measured peak, so plans of the two models at one budget compare at their own peaks.
Writes tools/bench/results/time_model.md.
"""

from __future__ import annotations

import argparse
import functools
import os

import torch

import common  # first: puts the repository root on sys.path
import memfit
from memfit.budget import format_bytes
from memfit.cost_models.memory import analyze_step
from memfit.cost_models.timing import profile_forward, step_time_s
from memfit.errors import BudgetError
from memfit.ir.capture import capture
from optimize import build

OUT = os.path.join(common.ROOT, "tools", "bench", "results")


def base_step_s(model, inputs, kwargs, loss_fn, time_model: str) -> float:
    """Predicted unmodified step (forward and backward): measured per node (the profile's
    forward and backward), or the roofline's forward and a backward twice as long."""
    cap = capture(model, inputs, kwargs, dynamic=False)
    if time_model == "measured":
        return profile_forward(cap).step_s()
    analyze_step(cap, loss_fn=loss_fn, symbolic=False)
    return step_time_s(sum(n.meta["memfit"].est_time_s for n in cap.gm.graph.nodes if "memfit" in n.meta), 0, 1.0)


def built(name, device):
    """(model, inputs, kwargs, loss_fn): a benchmark model of tools/bench/optimize.py, or a
    family of examples/hf_families.py (its own loss from labels=: loss_fn None)."""
    from examples import hf_families
    if name in hf_families.FAMILIES:
        model, inputs, kwargs = getattr(hf_families, name)()
        model = model.to(device)
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return model, tuple(t.to(device) for t in inputs), kwargs, None
    model, inputs, loss_fn, _ = build(name, device)
    return model, inputs, {}, loss_fn


def run_model(name, fractions, repeats, device):
    torch.manual_seed(0)
    model, inputs, kwargs, loss_fn = built(name, device)
    params = [p for p in model.parameters() if p.requires_grad]
    base = {tm: base_step_s(model, inputs, kwargs, loss_fn, tm) for tm in ("measured", "roofline")}
    variants = {"eager": model}
    rows = []
    for frac in fractions:
        for tm in ("measured", "roofline"):
            label = f"{frac:.0%} {tm}"
            try:
                om = memfit.optimize(model, f"{frac:.0%}", example_inputs=inputs, example_kwargs=kwargs,
                                     loss_fn=loss_fn, techniques="checkpoint", time_model=tm)
            except BudgetError:
                rows.append([label, "refused"] + ["-"] * 4)
                continue
            p = om.memfit_plan
            variants[label] = om
            m = memfit.measure(om, example_inputs=inputs, example_kwargs=kwargs, loss_fn=loss_fn)
            rows.append([label, format_bytes(m.peak_bytes), p.predicted_extra_time_s,
                         1.0 + p.predicted_extra_time_s / base[tm], None,
                         len([d for d in p.decisions if d.action == "recompute"])])
    step_loss = loss_fn if loss_fn is not None else (lambda out: out.loss)

    def call(v):
        return functools.partial(v, **kwargs) if kwargs else v

    for v in variants.values():
        common.step_time(call(v), inputs, step_loss, params)   # warm-up
    timing = common.alternated({k: functools.partial(common.step_time, call(v), inputs, step_loss, params)
                                for k, v in variants.items()}, repeats)
    cells = []
    worst = 0.0
    for r in rows:
        if r[1] == "refused":
            cells.append(r)
            continue
        label, peak, extra, pred, _, regions = r
        meas = timing.ratio[label]
        err = (pred - meas) / meas
        if label.endswith("measured"):
            worst = max(worst, abs(err))
        cells.append([label, peak, f"{extra * 1e3:.1f} ms", f"{pred:.2f}x", f"{meas:.2f}x", f"{err:+.0%}", regions])
    head = (f"### {name} (unmodified step {timing.median['eager'] * 1e3:.1f} ms measured; predicted "
            f"{base['measured'] * 1e3:.1f} ms from the profile, {base['roofline'] * 1e3:.1f} ms roofline)")
    return "\n".join([head, "", common.table(["plan (budget, time model)", "measured peak", "predicted extra",
                                              "predicted ratio", "measured ratio", "error", "regions"], cells)]), worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2_like,vit_like,hf_gpt2")
    ap.add_argument("--fractions", default="0.7,0.5")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",") if f]
    parts = [f"Machine: {common.machine(args.device)}", ""]
    worst = 0.0
    names = args.models.split(",")
    if names == ["families"]:
        from examples import hf_families
        names = list(hf_families.FAMILIES)
    for name in names:
        text, w = run_model(name, fractions, args.repeats, args.device)
        worst = max(worst, w)
        parts += [text, ""]
        print(text, flush=True)
    parts.append(f"largest error of a measured-model prediction: {worst:.0%}")
    print(parts[-1])
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "time_model.md"), "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
