"""Predicted (fake-tensor simulation) against measured (real step) memory, per model.

    python tools/bench/predict_vs_measure.py [--optimizer adamw] [--threads N] [--only t5,bart]

Prints a markdown table: saved-activation bytes and step peak, predicted and measured,
with relative errors. CPU measurement uses the allocator's events (torch.profiler).
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

import common  # first: puts the repository root on sys.path
import memfit


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(common.ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cases():
    from tests.models import MLP, Block, ConvBN
    yield "MLP (tests/models.py)", lambda: (MLP(), (torch.randn(64, 64),)), None
    yield "CNN with BatchNorm (tests/models.py)", lambda: (ConvBN(), (torch.randn(8, 3, 32, 32),)), None
    yield "transformer block (tests/models.py)", lambda: (Block(dropout=0.1), (torch.randn(4, 64, 64),)), None
    for name in ("gpt2_like", "vit_like", "resnet_like"):
        mod = _load(name)
        yield f"examples/{name}.py", mod.make, getattr(mod, "loss_fn", None)
    from examples import hf_families
    for name in hf_families.FAMILIES:   # each computes its own loss from labels= (output.loss)
        yield f"transformers {name} (examples/hf_families.py)", getattr(hf_families, name), None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--only", default="", help="comma-separated substrings of model names to run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from memfit.budget import format_bytes as fb
    print(f"machine: {common.machine()}; optimizer {args.optimizer}; {torch.get_num_threads()} threads; "
          "static plans (symbolic=False: the same bytes at the example size)")
    print(common.table(["model", "capture", "saved predicted", "saved measured", "error", "peak predicted",
                        "peak measured", "error"]))
    worst = 0.0
    for name, build, loss_fn in cases():
        if args.only and not any(k in name for k in args.only.split(",")):
            continue
        torch.manual_seed(0)
        built = build()
        model, inputs, kwargs = built if len(built) == 3 else (*built, {})
        model.train()
        p = memfit.plan(model, example_inputs=inputs, example_kwargs=kwargs, optimizer=args.optimizer,
                        loss_fn=loss_fn, symbolic=False)
        m = memfit.measure(model, example_inputs=inputs, example_kwargs=kwargs, optimizer=args.optimizer,
                           loss_fn=loss_fn)
        se = (p.categories["saved_activations"] - m.saved_activations) / max(1, m.saved_activations)
        pe = (p.peak_bytes - m.peak_bytes) / m.peak_bytes
        worst = max(worst, abs(pe))
        print(common.row([name, p.capture_method, fb(p.categories["saved_activations"]), fb(m.saved_activations),
                          f"{se:+.2%}", fb(p.peak_bytes), fb(m.peak_bytes), f"{pe:+.2%}"]), flush=True)
    print(f"\nlargest peak error: {worst:.2%}")


if __name__ == "__main__":
    main()
