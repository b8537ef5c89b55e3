"""Measured memory of the exact structural passes: fuse-conv-bn and sdpa-attention.

    PYTHONPATH=. python tools/bench/structural.py            # 3-5 minutes on 2 shared CPU cores
    PYTHONPATH=. python tools/bench/structural.py --quick    # smaller sizes, for a smoke run

For each model: one real training step (forward, loss, backward; no optimizer) of
- "captured": the captured graph without passes (the baseline: same capture road), and
- "rewritten": the graph after the pass,
measured with memfit.measure (saved activations from saved_tensors_hooks, the step's peak from
the CPU allocator's events), plus the prediction of memfit.cost_models.memory.analyze_step for
the rewritten graph. Step times are medians of alternating runs in this process (ratios only:
the machine is shared). A predicted-only row gives a full-size ResNet-50 (224 px, batch 32).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import torch
from torch import nn

import common  # first: puts the repository root on sys.path
from examples import gpt2_like, resnet_like
from memfit.budget import format_bytes as fb
from memfit.ir.capture import capture
from memfit.ir.module import OptimizedModule
from memfit.cost_models.memory import analyze_step
from memfit.cost_models.measure import measure
from memfit.passes import PassContext, PassManager


def bench(name, model, inputs, loss_fn, pipeline, reps=3):
    t_start = time.perf_counter()
    cap = capture(model, inputs, dynamic=False)
    base = OptimizedModule(model, cap)
    cap2 = capture(model, inputs, dynamic=False)
    res = PassManager(pipeline).run(cap2.gm, PassContext(captured=cap2))
    new = OptimizedModule(model, cap2, res.gm)
    m0 = measure(base, example_inputs=inputs, loss_fn=loss_fn)
    m1 = measure(new, example_inputs=inputs, loss_fn=loss_fn)
    pred = analyze_step(dataclasses.replace(cap2, gm=res.gm), loss_fn=loss_fn, symbolic=False)
    ratio = common.alternated({"captured": functools.partial(common.step_time, base, inputs, loss_fn),
                               "rewritten": functools.partial(common.step_time, new, inputs, loss_fn)},
                              reps).ratio["rewritten"]
    counts = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in res.stats.items() if v)
    row = dict(name=name, counts=counts, saved0=m0.saved_activations, saved1=m1.saved_activations,
               peak0=m0.peak_bytes, peak1=m1.peak_bytes, pred_saved1=pred.totals["saved_activations"],
               time_ratio=ratio)
    print(f"{name}: {counts}; saved {fb(row['saved0'])} -> {fb(row['saved1'])} "
          f"({100 * (1 - row['saved1'] / row['saved0']):.1f}% less; predicted {fb(row['pred_saved1'])}), "
          f"peak {fb(row['peak0'])} -> {fb(row['peak1'])} ({100 * (1 - row['peak1'] / row['peak0']):.1f}% less), "
          f"step time x{ratio:.2f} [{time.perf_counter() - t_start:.0f} s]", flush=True)
    return row


def predicted_only(name, model, inputs, loss_fn, pipeline):
    cap = capture(model, inputs, dynamic=False)
    before = analyze_step(cap, loss_fn=loss_fn, symbolic=False)
    res = PassManager(pipeline).run(cap.gm, PassContext(captured=cap))
    after = analyze_step(dataclasses.replace(cap, gm=res.gm), loss_fn=loss_fn, symbolic=False)
    s0, s1 = before.totals["saved_activations"], after.totals["saved_activations"]
    print(f"{name} (predicted): saved {fb(s0)} -> {fb(s1)} ({100 * (1 - s1 / s0):.1f}% less), peak "
          f"{fb(before.peak_bytes)} -> {fb(after.peak_bytes)} "
          f"({100 * (1 - after.peak_bytes / before.peak_bytes):.1f}% less)", flush=True)


def main():
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    q = args.quick

    b, px = (4, 32) if q else (4, 64)
    model, inputs = resnet_like.make(batch_size=b, image_size=px, freeze_bn=True)
    bench(f"ResNet-18-like, frozen BN (B={b}, {px} px)", model, inputs, resnet_like.loss_fn, "fuse-conv-bn")

    b, px = (2, 64) if q else (2, 96)
    model, inputs = resnet_like.resnet50_like(batch_size=b, image_size=px, freeze_bn=True)
    bench(f"ResNet-50-like, frozen BN (B={b}, {px} px)", model, inputs, resnet_like.loss_fn, "fuse-conv-bn")

    for T in ((64, 128) if q else (128, 256)):
        model, inputs = gpt2_like.make(batch_size=1, seq_len=T, dropout=0.0)
        bench(f"GPT-2-like, explicit attention (4 layers, d=256, B=1, T={T})", model, inputs,
              gpt2_like.loss_fn, "sdpa-attention")

    if not q:
        model, inputs = resnet_like.resnet50_like(batch_size=32, image_size=224, freeze_bn=True)
        predicted_only("ResNet-50-like, frozen BN (B=32, 224 px)", model, inputs, resnet_like.loss_fn,
                       "fuse-conv-bn")
        model, inputs = gpt2_like.make(batch_size=8, seq_len=1024, dropout=0.0)
        predicted_only("GPT-2-like, explicit attention (4 layers, d=256, B=8, T=1024)", model, inputs,
                       gpt2_like.loss_fn, "sdpa-attention")

    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
