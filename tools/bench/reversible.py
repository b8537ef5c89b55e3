"""Reversible coupling: saved-activation bytes against depth, step time, MEFT start point.

    python tools/bench/reversible.py            # print the tables
    python tools/bench/reversible.py --write    # also replace the "Reversible coupling"
                                                # section of tools/bench/RESULTS.md

1. examples/gpt2_like.py at 4, 8 and 16 layers: saved activations and step peak measured by
   memfit.measure (saved_tensors_hooks; CPU allocator events), unmodified against the
   reversible pass in pairs (RevViT) and meft modes; step time (forward + backward, no
   profiler) as medians of alternating runs, as ratios to the unmodified model.
2. transformers GPT-2 (4 layers, built from a config): MEFT output difference at
   initialization for several lam and both aux streams, and the gradient error through
   reconstruction against the same couplings with stored activations, with and without
   anchors.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
import warnings

import torch

import common  # first: puts the repository root on sys.path
from memfit.budget import format_bytes as fb
from memfit.cost_models.measure import measure
from memfit.ir.capture import capture
from memfit.passes import PassContext
from memfit.ir.module import OptimizedModule
from memfit.passes.reversible import Reversible, make_reversible, set_recompute, stacks
from memfit.runtime.reversible import ReconstructionWarning


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def depth_table():
    from examples.gpt2_like import loss_fn, make

    rows = []
    for layers in (4, 8, 16):
        torch.manual_seed(0)
        model, inputs = make(batch_size=2, seq_len=32, layers=layers, d=64, heads=2, vocab=256, dropout=0.1)
        # One export per depth (the slow part); each mode rewrites its own copy of the graph.
        cap = capture(model, inputs, dynamic=False)
        variants = {"unmodified": model}
        for mode in ("pairs", "meft"):
            res = Reversible(mode=mode).apply_to_clone(cap.gm, PassContext(captured=cap))
            variants[mode] = OptimizedModule(model, cap, res.gm, pass_result=res)
        meas = {k: measure(m, example_inputs=inputs, loss_fn=loss_fn) for k, m in variants.items()}
        ratio = common.alternated({k: functools.partial(common.step_time, m, inputs, loss_fn)
                                   for k, m in variants.items()}, 5).ratio
        for k in variants:
            rows.append((layers, k, meas[k].saved_activations, meas[k].peak_bytes, ratio[k]))
    return rows


def meft_table():
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=2, vocab_size=256, n_positions=64, use_cache=False,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    g = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        ref = g(input_ids=ids).logits
    rows = []
    for aux in ("copy", "delta"):
        rev = make_reversible(g, (ids,), mode="meft", aux=aux, dynamic=False)
        (stack,) = stacks(rev)
        for lam in (0.3, 0.1, 0.03, 0.01):
            stack.set_scaling(lam=lam)
            with torch.no_grad():
                d_init = rel(rev(ids).logits, ref)
            errs = []
            for k in (0, 2):
                stack.anchor_every = k
                grads = []
                for rc in (False, True):
                    set_recompute(rev, rc)
                    g.zero_grad(set_to_none=True)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", ReconstructionWarning)
                        rev(ids).logits.square().mean().backward()
                    grads.append([p.grad.clone() for p in g.parameters()])
                errs.append(max(rel(a, b) for a, b in zip(grads[1], grads[0])))
            stack.anchor_every = 0
            rows.append((aux, lam, d_init, errs[0], errs[1]))
    return rows


def render(depth, meft, wall, load):
    out = ["## Reversible coupling", "",
           f"`python tools/bench/reversible.py --write` ({common.machine()}; the cores shared with "
           f"other jobs; run took {wall:.0f} s; "
           f"1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end: step-time "
           "ratios are noisy at such loads).", "",
           "examples/gpt2_like.py, B=2, T=32, d=64, 2 heads, dropout 0.1; memfit.measure (saved: "
           "saved_tensors_hooks, peak: CPU allocator events, no optimizer); step time = forward + "
           "backward without profiler, median of 5 alternating runs (the unmodified model and the pairs/meft copies have separate parameters of the same size), relative to unmodified.", "",
           common.table(["layers", "variant", "saved activations", "step peak", "step time"],
                        [(layers, k, fb(saved), fb(peak), f"{t:.2f}x") for layers, k, saved, peak, t in depth])]
    by = {(layers, k): saved for layers, k, saved, _, _ in depth}
    for k in ("unmodified", "pairs", "meft"):
        out.append("")
        out.append(f"- {k}: saved bytes at 16 layers / 4 layers = {by[(16, k)] / by[(4, k)]:.2f}")
    out += ["", "transformers GPT-2 (4 layers, d=64, B=2, T=32, fp32), MEFT mode: relative L2 difference of "
            "the logits from the original model at initialization, and the largest relative gradient "
            "error (per parameter) through reconstruction against the same couplings with stored "
            "activations, without anchors and with anchor_every=2.", "",
            common.table(["aux", "lam", "logits diff at init", "grad error, no anchors", "grad error, anchor_every=2"],
                         [(aux, f"{lam:g}", f"{d:.2e}", f"{e0:.1e}", f"{e2:.1e}") for aux, lam, d, e0, e2 in meft])]
    out += ["", "The start-point error falls linearly with lam (and is smaller with aux=delta, which "
            "carries the residual updates instead of the hidden states); the reconstruction error "
            "grows like (1/lam) per rebuilt block, which anchors cut short. See docs/reversible.md.", ""]
    return "\n".join(out)


def write_section(text: str) -> None:
    path = os.path.join(common.ROOT, "tools", "bench", "RESULTS.md")
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    head = "## Reversible coupling"
    if head in old:
        start = old.index(head)
        nxt = old.find("\n## ", start + len(head))
        new = old[:start] + text + (old[nxt + 1:] if nxt != -1 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + text
    with open(path, "w") as f:
        f.write(new)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="replace the section in tools/bench/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    depth = depth_table()
    meft = meft_table()
    text = render(depth, meft, time.perf_counter() - t0, (load0, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
