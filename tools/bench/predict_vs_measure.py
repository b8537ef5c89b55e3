"""Predicted (fake-tensor simulation) against measured (real step) memory, per model.

    python tools/bench/predict_vs_measure.py [--optimizer adamw]

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
    hf = _load("hf_models")
    for name in ("gpt2", "bert", "vit", "resnet", "convnext"):
        yield f"transformers {name} (examples/hf_models.py)", getattr(hf, name), hf.loss_fn


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="adamw")
    args = ap.parse_args()
    print(f"machine: {common.machine()}; optimizer {args.optimizer}")
    print(common.table(["model", "capture", "saved predicted", "saved measured", "error", "peak predicted",
                        "peak measured", "error"]))
    fb = memfit.budget.format_bytes if hasattr(memfit, "budget") else None
    from memfit.budget import format_bytes as fb
    for name, build, loss_fn in cases():
        torch.manual_seed(0)
        model, inputs = build()
        model.train()
        p = memfit.plan(model, example_inputs=inputs, optimizer=args.optimizer, loss_fn=loss_fn)
        m = memfit.measure(model, example_inputs=inputs, optimizer=args.optimizer, loss_fn=loss_fn)
        se = (p.categories["saved_activations"] - m.saved_activations) / max(1, m.saved_activations)
        pe = (p.peak_bytes - m.peak_bytes) / m.peak_bytes
        print(common.row([name, p.capture_method, fb(p.categories["saved_activations"]), fb(m.saved_activations),
                          f"{se:+.2%}", fb(p.peak_bytes), fb(m.peak_bytes), f"{pe:+.2%}"]), flush=True)


if __name__ == "__main__":
    main()
