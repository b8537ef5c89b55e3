"""memfit.optimize against the alternatives, side by side in one process, per model.

    python tools/bench/optimize.py                          # all models, budgets 75/50/25/10%
    python tools/bench/optimize.py --models gpt2_like --compile-ratios 0.5,0.2

Variants: eager (unmodified), torch.utils.checkpoint on every block, torch.compile (Inductor)
with `activation_memory_budget` ratios, and memfit.optimize at budgets that are fractions of
the unoptimized step's predicted peak (default techniques: exact passes, then 8-bit saved
activations where recompute cannot reach the budget). One step = forward, loss, backward,
SGD step (no optimizer state, so the budgets are mostly about activations).

Per variant: measured peak (memfit.measure: CPU allocator events, or
torch.cuda.max_memory_allocated), predicted peak (memfit's plan), step-time ratio to eager
(forward + backward, medians of alternated repeats), whole-model gradient relative error
against eager (same seed; models are built without dropout so Inductor's RNG does not
enter). Writes tools/bench/results/optimize.md and a Pareto plot (peak against step time)
per model, tools/bench/results/pareto_<model>.png.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time

import torch

import common  # first: puts the repository root on sys.path
import memfit
from memfit.budget import format_bytes
from memfit.errors import BudgetError

OUT = os.path.join(common.ROOT, "tools", "bench", "results")


def build(name: str, device: str):
    """(model, inputs, loss_fn, blocks), without dropout."""
    if name == "gpt2_like":
        from examples import gpt2_like as ex
        m, x = ex.make(batch_size=8, seq_len=256, layers=4, d=128, heads=4, vocab=1024, dropout=0.0)
        blocks = list(m.h)
    elif name == "vit_like":
        from examples import vit_like as ex
        m, x = ex.make(batch_size=16, image_size=64, layers=4, d=128, heads=4)
        blocks = list(m.blocks)
    elif name == "resnet_like":
        from examples import resnet_like as ex
        m, x = ex.make(batch_size=16, image_size=64, width=16)
        blocks = [b for stage in m.stages for b in stage]
    elif name == "hf_gpt2":
        from examples import hf_models as ex
        m, x = ex.gpt2(batch_size=8, seq_len=256, layers=4, d=128, heads=4)
        m.config.resid_pdrop = m.config.embd_pdrop = m.config.attn_pdrop = 0.0
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        blocks = list(m.transformer.h)
    else:
        raise SystemExit(f"unknown model {name!r}")
    m = m.to(device)
    return m, tuple(t.to(device) for t in x), ex.loss_fn, blocks


def grads_of(fn, model, inputs, loss_fn):
    torch.manual_seed(0)
    model.zero_grad(set_to_none=True)
    loss_fn(fn(*inputs)).backward()
    g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return g


def rel_err(a, b) -> float:
    num = sum((x.double() - y.double()).pow(2).sum() for x, y in zip(a, b)) ** 0.5
    den = sum(y.double().pow(2).sum() for y in b) ** 0.5
    return float(num / den)


def run_model(name, fractions, compile_ratios, repeats, device):
    torch.manual_seed(0)
    model, inputs, loss_fn, blocks = build(name, device)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_grads = grads_of(model, model, inputs, loss_fn)
    base_plan = memfit.plan(model, example_inputs=inputs, optimizer="sgd", loss_fn=loss_fn, symbolic=False)
    variants = []   # (label, callable, budget_bytes, predicted_peak, measured, grad_err, note)

    def add(label, fn, budget=None, predicted=None, note=""):
        common.step_time(fn, inputs, loss_fn, params)  # warm-up (compiles)
        m = memfit.measure(fn, example_inputs=inputs, optimizer="sgd", loss_fn=loss_fn)
        variants.append([label, fn, budget, predicted, m, rel_err(grads_of(fn, model, inputs, loss_fn), ref_grads),
                         note])

    add("eager", model, predicted=base_plan.peak_bytes)
    pb = common.PerBlock(blocks)

    class PerBlockModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *a):
            with pb.active():
                return model(*a)

    add(f"checkpoint per block ({len(blocks)})", PerBlockModel())
    for r in compile_ratios:
        import torch._functorch.config as fconf
        torch._dynamo.reset()
        with fconf.patch(activation_memory_budget=r):
            c = torch.compile(model)
            common.step_time(c, inputs, loss_fn, params)   # compile under the patched config

            class Compiled(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.inner = model

                def forward(self, *a, _c=c):
                    return _c(*a)

            add(f"torch.compile activation_memory_budget={r}", Compiled())
    for frac in fractions:
        t0 = time.perf_counter()
        try:
            om = memfit.optimize(model, f"{frac:.0%}", example_inputs=inputs, optimizer="sgd", loss_fn=loss_fn)
        except BudgetError as e:
            variants.append([f"memfit {frac:.0%}", None, int(frac * base_plan.peak_bytes), None, None, None,
                             "BudgetError: " + str(e).split(":")[1].split("(")[0].strip()])
            continue
        dt = time.perf_counter() - t0
        p = om.memfit_plan
        acts = sorted({d.action.split("{")[0] for d in p.decisions})
        add(f"memfit {frac:.0%}", om, p.budget_bytes, p.peak_bytes,
            note=f"{', '.join(acts) or 'no change'}; planned in {dt:.0f} s")
    timing = common.alternated({v[0]: functools.partial(common.step_time, v[1], inputs, loss_fn, params)
                                for v in variants if v[1] is not None}, repeats)
    t_eager = timing.median["eager"]
    cells = []
    points = []
    for label, fn, budget, pred, m, gerr, note in variants:
        if m is None:
            cells.append([label, format_bytes(budget) if budget else "-"] + ["-"] * 6 + [note])
            continue
        ratio = timing.ratio[label]
        err = f"{(pred - m.peak_bytes) / m.peak_bytes:+.1%}" if pred else "-"
        fits = "-" if budget is None else ("yes" if m.peak_bytes <= budget else "**no**")
        cells.append([label, format_bytes(budget) if budget else "-", format_bytes(m.peak_bytes),
                      format_bytes(pred) if pred else "-", err, fits, f"{ratio:.2f}x", f"{gerr:.1e}", note])
        points.append((label, m.peak_bytes, ratio))
    _plot(name, points)
    return "\n".join([f"### {name} (unmodified: predicted peak {format_bytes(base_plan.peak_bytes)}, saved activations "
                      f"{format_bytes(base_plan.categories['saved_activations'])}, step {t_eager * 1e3:.0f} ms)", "",
                      common.table(["variant", "budget", "measured peak", "predicted peak", "error", "fits",
                                    "step time", "grad rel. error", "notes"], cells)])


def _plot(name, points):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, peak, ratio in points:
        marker = "o" if label.startswith("memfit") else ("s" if "compile" in label else "^")
        ax.scatter(peak / 2**20, ratio, marker=marker, s=40)
        ax.annotate(label.replace("torch.compile activation_memory_budget=", "compile "), (peak / 2**20, ratio),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("measured peak of one training step (MiB)")
    ax.set_ylabel("step time / eager")
    ax.set_title(f"{name}: memory against time (lower left is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, f"pareto_{name}.png"), dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2_like,vit_like,resnet_like,hf_gpt2")
    ap.add_argument("--fractions", default="0.75,0.5,0.25,0.1")
    ap.add_argument("--compile-ratios", default="0.5", help="activation_memory_budget values ('' for none)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    fr = [float(f) for f in args.fractions.split(",") if f]
    cr = [float(f) for f in args.compile_ratios.split(",") if f]
    dev = args.device
    head = [f"`python tools/bench/optimize.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
            f"({common.machine(dev)})", ""]
    print("\n".join(head), flush=True)
    body = []
    for name in args.models.split(","):
        t = run_model(name, fr, cr, args.repeats, dev)
        print(t + "\n", flush=True)
        body.append(t)
    with open(os.path.join(OUT, "optimize.md"), "w") as f:
        f.write("\n".join(head) + "\n" + "\n\n".join(body) + "\n")


if __name__ == "__main__":
    main()
