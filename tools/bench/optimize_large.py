"""memfit.optimize on GPT-2-small dimensions at a fraction of the predicted peak: plan, then
one real training step measured (no unoptimized step: at B=8, T=1024 it would need about
24 GiB).

    python tools/bench/optimize_large.py [--budget 25%] [--batch 8] [--seq 1024]

Model: examples/gpt2_like.py:gpt2_small built on the CPU (12 layers, d=768, 12 heads, vocab
50257, dropout 0.1), SGD step, loss = cross-entropy of the logits. Prints the plan's
decisions, the predicted and measured peak (memfit.measure: CPU allocator events, or CUDA's
max_memory_allocated on a GPU) and the planning and step wall times.
"""

from __future__ import annotations

import argparse
import time

import torch

import common  # first: puts the repository root on sys.path
import memfit
from examples import gpt2_like as ex
from memfit.budget import format_bytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, inputs = ex.gpt2_small(batch_size=args.batch, seq_len=args.seq, device=device)
    om = memfit.optimize(model, args.budget, example_inputs=inputs, optimizer="sgd", loss_fn=ex.loss_fn)
    plan_s = time.perf_counter() - t0
    p = om.memfit_plan
    print(f"GPT-2-small dims, B={args.batch}, T={args.seq}, SGD; {common.machine(device)}; "
          f"budget {args.budget} = {format_bytes(p.budget_bytes)}")
    for d in p.decisions:
        print(f"  {d.target:<28} {d.action:<22} saves {format_bytes(d.saved_bytes)}  {d.detail}")
    t0 = time.perf_counter()
    m = memfit.measure(om, example_inputs=inputs, optimizer="sgd", loss_fn=ex.loss_fn)
    step_s = time.perf_counter() - t0
    err = (p.peak_bytes - m.peak_bytes) / m.peak_bytes * 100
    print(f"predicted peak {p.peak_bytes} B ({format_bytes(p.peak_bytes)}), measured {m.peak_bytes} B "
          f"({format_bytes(m.peak_bytes)}), error {err:+.3f}%, within budget: {m.peak_bytes <= p.budget_bytes}")
    print(f"planning {plan_s:.0f} s, measured step {step_s:.0f} s")


if __name__ == "__main__":
    main()
