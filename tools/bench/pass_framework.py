"""Pass framework figures: what the guide's example pass (examples/custom_pass.py,
checkpoint-blocks) saves, measured, and what verify mode costs in PassManager time.

    PYTHONPATH=. python tools/bench/pass_framework.py

Small sizes (a 4-block MLP tower, the GPT-2-like example with 2 layers), medians of 5
alternating runs, so it finishes in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import time

import torch

import common  # first: puts the repository root on sys.path


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(common.ROOT, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    from memfit.ir.capture import capture
    from memfit.cli.util import load_factory
    from memfit.cost_models.measure import measure
    from memfit.passes import PassContext, PassManager

    import logging
    logging.disable(logging.WARNING)  # the sdpa pass's dropout warnings, once per run
    torch.set_num_threads(2)
    ex = _load("examples/custom_pass.py", "memfit_example_custom_pass")
    model, inputs = ex.make(batch_size=8, seq=64, d=64, depth=4)
    ref = copy.deepcopy(model)
    cap = capture(model, inputs)
    res = PassManager("checkpoint-blocks").run(cap.gm, PassContext(captured=cap))
    before, after = measure(ref, example_inputs=inputs), measure(res.gm, example_inputs=inputs)
    print("checkpoint-blocks on examples/custom_pass.py:make(batch_size=8, seq=64, d=64, depth=4)")
    print(f"  saved activations (measured): {before.saved_activations} -> {after.saved_activations} bytes "
          f"({after.saved_activations / before.saved_activations:.3f}x)")
    print(f"  step peak (measured):         {before.peak_bytes} -> {after.peak_bytes} bytes "
          f"({after.peak_bytes / before.peak_bytes:.3f}x)")

    model, args, kw = load_factory(os.path.join(common.ROOT, "examples/gpt2_like.py:make"), None,
                                   dict(layers=2, d=64, seq_len=64, batch_size=4))

    def run_passes(verify):  # the capture stays off the clock
        cap = capture(model, args, kw, dynamic=False)
        t0 = time.perf_counter()
        PassManager("sdpa-attention{allow_dropout=true},quantize-activations", verify=verify).run(
            cap.gm, PassContext(captured=cap))
        return time.perf_counter() - t0

    med = common.alternated({"off": functools.partial(run_passes, False),
                             "on": functools.partial(run_passes, True)}, 5).median
    off, on = med["off"], med["on"]
    print("PassManager on gpt2_like(layers=2, d=64, seq_len=64, batch_size=4), "
          "pipeline sdpa-attention{allow_dropout=true},quantize-activations")
    print(f"  median time: {off * 1e3:.0f} ms without verify, {on * 1e3:.0f} ms with verify ({on / off:.1f}x)")


if __name__ == "__main__":
    main()
