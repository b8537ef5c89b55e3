"""The CUDA caching allocator: memfit's simulated max_memory_allocated and max_memory_reserved
(memfit.cost_models.cuda_allocator) against a real device's, per model.

    python tools/bench/allocator.py [--steps 3] [--only gpt2,vit] [--expandable]

Each model runs in a fresh process (what is reserved depends on everything the process allocated
before): the model and its inputs are moved to the device, AdamW's state is made, then `--steps`
training steps run, and torch.cuda.max_memory_allocated / max_memory_reserved are read after
them, against memfit.plan's simulation of the same steps. `--expandable` sets
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True in the children. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

import common  # noqa: F401 - puts the repository root on sys.path
import predict_vs_measure


def one(name: str, steps: int) -> dict:
    """In this process: the named case's prediction and measurement."""
    import memfit
    from memfit.cost_models.memory import default_loss

    build, loss_fn = next((b, lf) for n, b, lf in predict_vs_measure.cases() if n == name)
    torch.manual_seed(0)
    built = build()
    model, inputs, kwargs = built if len(built) == 3 else (*built, {})
    dev = torch.device("cuda")
    model = model.to(dev).train()
    inputs = tuple(t.to(dev) for t in inputs)
    kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    p = memfit.plan(model, example_inputs=inputs, example_kwargs=kwargs, optimizer="adamw", loss_fn=loss_fn,
                    symbolic=False)
    opt = torch.optim.AdamW(model.parameters())
    lf = loss_fn or default_loss
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        lf(model(*inputs, **kwargs)).backward()
        opt.step()
    torch.cuda.synchronize()
    return {"predicted": p.allocator, "exact_peak": p.peak_bytes,
            "allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated substrings of model names")
    ap.add_argument("--expandable", action="store_true")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.steps)))
        return
    if not torch.cuda.is_available():
        sys.exit("allocator.py: needs a CUDA device")
    env = dict(os.environ)
    if a.expandable:
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    print(common.machine("cuda"), "; expandable_segments" if a.expandable else "; default segments",
          f"; {a.steps} AdamW steps per fresh process")
    rows = []
    for name, _, _ in predict_vs_measure.cases():
        if a.only and not any(k in name for k in a.only.split(",")):
            continue
        r = subprocess.run([sys.executable, __file__, "--one", name, "--steps", str(a.steps)], env=env,
                           capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        if r.returncode != 0:
            rows.append([name, "error: " + (r.stderr.strip().splitlines() or ["?"])[-1], "", "", "", "", ""])
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        pa, pr = d["predicted"]["allocated"], d["predicted"]["reserved"]
        rows.append([name, d["allocated"], pa, f"{pa / d['allocated'] - 1:+.2%}", d["reserved"], pr,
                     f"{pr / d['reserved'] - 1:+.2%}"])
    print(common.table(["model", "max_memory_allocated", "predicted", "error", "max_memory_reserved", "predicted",
                        "error"], rows))


if __name__ == "__main__":
    main()
