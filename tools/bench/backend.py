"""The memfit torch.compile backend against torch.compile's own memory knob, side by side.

    python tools/bench/backend.py [--codegen inductor|eager] [--layers 2] [--rounds 7] [--only 1,2,5]

Model: a GPT-like stack of pre-LN transformer blocks (tests/models.py Block, explicit
attention, dropout 0.1) with a final LayerNorm and a linear head; loss = mean of squares.
Variants, compiled in one process and timed alternately (medians of `--rounds` steps each):

- torch.compile default (Inductor's min-cut partition),
- torch.compile with torch._functorch.config.activation_memory_budget = 0.5 and 0.2,
- memfit backend, no budget and budgets 50% / 20% / 10% (of the default partition's saved
  bytes), recompute only (the default: exact first) and with quantize="prefer" (8-bit saved
  tensors before recomputing).

Columns: saved activations measured with saved_tensors_hooks during a real step (storages
de-duplicated, parameters and inputs excluded), step peak above parameters/inputs read
from torch.profiler allocator events (memfit.measure), step time (forward + backward) and
gradient error (relative, whole model) against torch.compile default at the same seed (compiled variants draw the
same dropout masks in forward; eager draws others, so it has no entry). With `--codegen eager` the torch.compile variants use
aot_eager-style code (AOTAutograd with the same partitioners, no Inductor) so the run is
fast; the memory decisions are the same kind, the times are not Inductor's.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import warnings

import torch
from torch import nn

import common  # first: puts the repository root on sys.path
import memfit
import memfit.compile as mb
from memfit.budget import format_bytes
from tests.models import Block

warnings.filterwarnings("ignore", category=FutureWarning)


class GPTLike(nn.Module):
    def __init__(self, layers=2, d=128, heads=4, dropout=0.1):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d, heads, dropout) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, d)

    def forward(self, x):  # (B, T, d) -> (B, T, d)
        return self.head(self.ln(self.blocks(x)))


def loss_fn(out):
    return out.float().pow(2).mean()


def _upstream_backend(codegen: str, ratio: float | None):
    """torch.compile's own path with activation_memory_budget = ratio (None: default)."""
    from torch._functorch import config as fconfig

    if codegen == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def backend(gm, example_inputs):
            with fconfig.patch(activation_memory_budget=1.0 if ratio is None else ratio,
                               enable_autograd_cache=False):
                return compile_fx(gm, example_inputs)
    else:
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        from torch._inductor.decomposition import select_decomp_table

        def backend(gm, example_inputs):
            with fconfig.patch(activation_memory_budget=1.0 if ratio is None else ratio,
                               enable_autograd_cache=False):
                return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop,
                                    decompositions=select_decomp_table(),
                                    partition_fn=min_cut_rematerialization_partition)(gm, example_inputs)
    return backend


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--codegen", choices=("inductor", "eager"), default="inductor")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    # One thread: on a shared, oversubscribed CPU two OpenMP threads made steps 10x slower.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma-separated row numbers to run (0 = eager, "
                    "1 = torch.compile default, ...); default all. Row 1 is the reference.")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Every variant is a separate backend on the same forward: Dynamo keeps one cache entry
    # per backend, and past its recompile limit (8) it would silently run eager.
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 256
    torch.manual_seed(0)
    model = GPTLike(args.layers, args.d)
    x = torch.randn(args.batch, args.seq, args.d)
    params = list(model.parameters())

    variants = [
        ("eager (no compile)", None, None),
        ("torch.compile default", _upstream_backend(args.codegen, None), None),
        ("torch.compile activation_memory_budget=0.5", _upstream_backend(args.codegen, 0.5), None),
        ("torch.compile activation_memory_budget=0.2", _upstream_backend(args.codegen, 0.2), None),
        ("memfit backend, no budget", mb.make_backend(None, codegen=args.codegen), "memfit"),
        ("memfit backend, budget 50%", mb.make_backend("50%", codegen=args.codegen), "memfit"),
        ("memfit backend, budget 20%", mb.make_backend("20%", codegen=args.codegen), "memfit"),
        ("memfit backend, budget 50%, quantize=prefer",
         mb.make_backend("50%", codegen=args.codegen, quantize="prefer"), "memfit"),
        ("memfit backend, budget 20%, quantize=prefer",
         mb.make_backend("20%", codegen=args.codegen, quantize="prefer"), "memfit"),
        ("memfit backend, budget 10%", mb.make_backend("10%", codegen=args.codegen), "memfit"),
        ("memfit backend, budget 10%, quantize=prefer",
         mb.make_backend("10%", codegen=args.codegen, quantize="prefer"), "memfit"),
    ]

    if args.only:
        keep = {int(i) for i in args.only.split(",")} | {1}
        variants = [v for i, v in enumerate(variants) if i in keep]

    rows = []
    fns = []
    ref = None
    for name, backend, kind in variants:
        torch._dynamo.reset()
        if kind == "memfit":
            mb.clear_reports()
        t0 = time.perf_counter()
        fn = model if backend is None else torch.compile(model, backend=backend)
        torch.manual_seed(1)
        model.zero_grad(set_to_none=True)
        # compiles; not common.step_time, which would drop the gradients compared below
        loss_fn(fn(x)).backward()
        compile_s = time.perf_counter() - t0
        grads = [p.grad.clone() for p in params]
        if ref is None and backend is not None:
            ref = grads  # torch.compile default: same RNG draws as the other compiled variants
        err = float("nan") if backend is None else (
            torch.stack([(g - r).norm() ** 2 for g, r in zip(grads, ref)]).sum().sqrt()
            / torch.stack([r.norm() ** 2 for r in ref]).sum().sqrt()).item()
        m = memfit.measure(fn, example_inputs=(x,), loss_fn=loss_fn)
        rep = mb.last_report() if kind == "memfit" else None
        rows.append({"name": name, "saved": m.saved_activations, "peak": m.peak_bytes - m.baseline_bytes,
                     "err": err, "compile_s": compile_s, "report": rep})
        fns.append(fn)
        print(f"compiled {name} in {compile_s:.1f} s", file=sys.stderr)

    # The warm-up round recompiles after the resets above.
    timing = common.alternated({row["name"]: functools.partial(common.step_time, fn, (x,), loss_fn, params)
                                for row, fn in zip(rows, fns)}, args.rounds, "torch.compile default", warmup=1)

    base_saved = next(r for r in rows if r["name"] == "torch.compile default")["saved"]
    print(f"GPT-like stack: {args.layers} blocks, d={args.d}, heads=4, B={args.batch}, T={args.seq}, "
          f"dropout 0.1; codegen {args.codegen}; {common.machine()}\n")
    print(common.table(["variant", "saved activations (measured)", "vs default", "step peak above params+inputs",
                        "step time (median)", "vs default", "memfit decision",
                        "grad rel. error vs torch.compile default, same seed"]))
    for row in rows:
        t, ratio = timing.median[row["name"]], timing.ratio[row["name"]]
        rep = row["report"]
        dec = "-"
        if rep is not None and rep.partitions:
            p = rep.partitions[0]
            dec = (f"planned {format_bytes(p.saved_bytes)} of {format_bytes(p.baseline_saved_bytes)}, "
                   f"{p.recomputed_nodes} recomputed ops, ratio {p.ratio if p.ratio is not None else 1.0:.3g}, "
                   f"{len(p.trials)} trials")
            if p.quantized:
                dec += (f", {len(p.quantized)} saved tensors in {p.quantize_bits} bits "
                        f"({format_bytes(p.quantized_bytes)} -> {format_bytes(p.quantized_packed_bytes)})")
            dec += f", predicted extra {p.predicted_extra_s * 1e3:.2g} ms"
        print(common.row([row["name"], format_bytes(row["saved"]), f"{row['saved'] / base_saved:.2f}",
                          format_bytes(row["peak"]), f"{t * 1e3:.1f} ms", f"{ratio:.2f}", dec, f"{row['err']:.1e}"]))


if __name__ == "__main__":
    main()
