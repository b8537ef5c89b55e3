"""Benchmark of quantize-activations.

    python tools/bench/quantize.py [--repeats 7] [--skip-memory]

CPU (always): step time (forward + backward) of the captured graph with and without the pass,
alternating variants in one process, medians and their ratio; saved-activation bytes measured
(memfit.measure) and predicted (analyze_step) on the examples.
GPU (only with CUDA): kernel bandwidth of quantize + dequantize as a fraction of the device's
measured copy bandwidth (bytes read plus written), and the step overhead at 8 bits.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics

import torch

import common  # first: puts the repository root on sys.path
from memfit.ir.capture import capture
from memfit.passes import PassContext
from memfit.passes.quantize import QuantizeActivations


def _load(name):
    import importlib.util
    path = os.path.join(common.ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"examples_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SIZES = {
    "gpt2_like": dict(batch_size=2, seq_len=64, layers=2, d=64, heads=4, vocab=128),
    "vit_like": dict(batch_size=4, image_size=32, layers=2, d=64, heads=4),
}


def step_times(name: str, bits_list=(8, 4), repeats: int = 7, device="cpu"):
    """Median fwd+bwd seconds of the captured graph, unquantized and at each bit width."""
    mod = _load(name)
    torch.manual_seed(0)
    model, inputs = mod.make(**SIZES[name])
    model = model.to(device)
    inputs = tuple(t.to(device) for t in inputs)
    cap = capture(model, inputs, dynamic=False)
    variants = {"unquantized": cap.gm}
    import copy
    for b in bits_list:
        gm = copy.deepcopy(cap.gm)  # parameters copied too: same values, independent graph
        variants[f"{b}-bit"] = QuantizeActivations(bits=b).run(gm, PassContext(captured=cap)).gm

    def loss_fn(out):  # the captured graph returns a flat tuple, the model's output first
        return mod.loss_fn(out[0])

    runs = {k: functools.partial(common.step_time, gm, inputs, loss_fn) for k, gm in variants.items()}
    return common.alternated(runs, repeats, warmup=1).median


def memory_rows():
    import memfit
    from memfit.cost_models.memory import analyze_step
    from memfit.ir.module import OptimizedModule
    rows = []
    for name in SIZES:
        for dtype in (torch.float32, torch.bfloat16):
            mod = _load(name)
            torch.manual_seed(0)
            model, inputs = mod.make(**SIZES[name])
            model = model.to(dtype)
            inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
            cap = capture(model, inputs, dynamic=False)
            kw = dict(example_inputs=inputs, loss_fn=mod.loss_fn)
            base = memfit.measure(OptimizedModule(model, cap), **kw).saved_activations
            cap.gm = QuantizeActivations().run(cap.gm, PassContext(captured=cap)).gm
            meas = memfit.measure(OptimizedModule(model, cap), **kw).saved_activations
            pred = analyze_step(cap, loss_fn=mod.loss_fn, symbolic=False).totals["saved_activations"]
            rows.append((name, str(dtype).replace("torch.", ""), base, meas, pred))
    return rows


def gpu_bandwidth(numel: int = 64 * 2**20, repeats: int = 20):
    """Quantize + dequantize bandwidth over the device's copy bandwidth (bytes read + written)."""
    from memfit.kernels.triton import quant as T
    dev = torch.device("cuda")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(numel, device=dev, dtype=dtype)
        y = torch.empty_like(x)

        # Not common.step_time: CUDA events time the kernels alone, and no step runs here.
        def timed(fn):
            fn()
            torch.cuda.synchronize()
            ts = []
            for _ in range(repeats):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                torch.cuda.synchronize()
                ts.append(s.elapsed_time(e) / 1e3)
            return statistics.median(ts)

        copy_bw = 2 * x.numel() * x.element_size() / timed(lambda: y.copy_(x))
        for bits in (8, 4, 2):
            packed = T.quantize(x, bits, 256)
            pbytes = sum(t.numel() * t.element_size() for t in packed)
            tq = timed(lambda: T.quantize(x, bits, 256))
            td = timed(lambda: T.dequantize(*packed, x.shape, dtype, bits, 256))
            moved = 2 * (x.numel() * x.element_size() + pbytes)
            out[(str(dtype), bits)] = (moved / (tq + td)) / copy_bw
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    print(common.machine())
    print("\n## CPU step time (forward + backward, median of %d, alternating)" % args.repeats)
    print(common.table(["model", "unquantized", "8-bit", "4-bit", "8-bit / unquantized", "4-bit / unquantized"]))
    for name in SIZES:
        t = step_times(name, repeats=args.repeats)
        u = t["unquantized"]
        print(common.row([name, f"{u * 1e3:.1f} ms", f"{t['8-bit'] * 1e3:.1f} ms", f"{t['4-bit'] * 1e3:.1f} ms",
                          f"{t['8-bit'] / u:.2f}x", f"{t['4-bit'] / u:.2f}x"]))
    if not args.skip_memory:
        print("\n## Saved activations at 8 bits (measured, predicted)")
        print(common.table(["model", "dtype", "unquantized", "8-bit measured", "ratio", "8-bit predicted",
                            "prediction error"]))
        for name, dt, base, meas, pred in memory_rows():
            print(common.row([name, dt, f"{base} B", f"{meas} B", f"{meas / base:.3f}x", f"{pred} B",
                              f"{(pred - meas) / meas * 100:+.2f}%"]))
    if torch.cuda.is_available():
        print("\n## GPU kernel bandwidth (fraction of copy bandwidth, goal >= 0.8)")
        for (dt, bits), frac in gpu_bandwidth().items():
            print(common.row([dt, f"{bits}-bit", f"{frac:.2f}"]))
        print("\n## GPU step time")
        for name in SIZES:
            t = step_times(name, device="cuda", repeats=args.repeats)
            print(common.row([name, f"8-bit / unquantized {t['8-bit'] / t['unquantized']:.3f}x"]))
    else:
        print("\n(no CUDA device: GPU bandwidth and step overhead skipped)")


if __name__ == "__main__":
    main()
