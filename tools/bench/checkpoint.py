"""Checkpointing benchmark: memfit's budget-driven checkpoint pass against
torch.utils.checkpoint on every block and torch.compile's activation_memory_budget.

    python tools/bench/checkpoint.py                 # examples + two transformers models
    python tools/bench/checkpoint.py --compile       # also torch.compile (slow on CPU)
    python tools/bench/checkpoint.py --models gpt2_like --repeats 5

Budgets are 75/50/25% of the unoptimized step's activation memory: bytes =
(measured peak - measured saved activations) + fraction * saved activations. For each
variant: measured peak (memfit.measure: CPU allocator events), retained bytes (what the
forward and loss leave allocated for backward, from the allocator's events) and the
median step time (forward + backward, no optimizer) relative to the unmodified model,
variants alternated in one process. torch.compile is given the same fraction as its
`activation_memory_budget` (a ratio, not bytes).
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time

import torch

import common  # first: puts the repository root on sys.path
from memfit.budget import format_bytes
from memfit.ir.capture import capture
from memfit.errors import BudgetError
from memfit.cost_models.measure import measure
from memfit.ir.module import OptimizedModule
from memfit.passes.checkpoint import CheckpointPlanner


def build(name, **size):
    """(model, inputs, loss_fn, blocks): blocks are the modules per-block checkpointing wraps.
    `size`: the example factory's arguments to change (d=256, seq_len=256, ...)."""
    from examples import gpt2_like, hf_models, resnet_like, vit_like
    t = dict(batch_size=4, seq_len=128, layers=4, d=128, heads=4)
    img = dict(batch_size=8, image_size=64, layers=4, d=128, heads=4)
    make, kw, loss, blocks = {
        "gpt2_like": (gpt2_like.make, dict(t, vocab=512), gpt2_like.loss_fn, lambda m: m.h),
        "vit_like": (vit_like.make, img, vit_like.loss_fn, lambda m: m.blocks),
        "resnet_like": (resnet_like.make, dict(batch_size=8, image_size=64, width=16), resnet_like.loss_fn,
                        lambda m: [b for stage in m.stages for b in stage]),
        "hf_gpt2": (hf_models.gpt2, t, hf_models.loss_fn, lambda m: m.transformer.h),
        "hf_bert": (hf_models.bert, t, hf_models.loss_fn, lambda m: m.bert.encoder.layer),
        "hf_vit": (hf_models.vit, dict(img, batch_size=4), hf_models.loss_fn, lambda m: m.vit.layers),
    }[name]
    m, x = make(**{**kw, **{k: v for k, v in size.items() if k in kw}})
    return m, x, loss, list(blocks(m))


def retained_bytes(fn, inputs, loss_fn) -> int:
    """Bytes the forward and loss leave allocated (held for backward), from allocator events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = loss_fn(fn(*inputs))
    total = 0

    def walk(ev):
        nonlocal total
        if ev.tag == torch._C._profiler._EventType.Allocation:  # noqa: SLF001
            if ev.extra_fields.device.type == "cpu":
                total += ev.extra_fields.alloc_size
        for c in ev.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    loss.backward()
    return total


def run_model(name, fractions, repeats, use_compile):
    torch.manual_seed(0)
    model, inputs, loss_fn, blocks = build(name)
    params = [p for p in model.parameters() if p.requires_grad]
    base = measure(model, example_inputs=inputs, loss_fn=loss_fn)
    acts = base.saved_activations
    non_act = base.peak_bytes - acts
    t0 = time.perf_counter()
    cap = capture(model, inputs, dynamic=False)
    planner = CheckpointPlanner(cap, loss_fn=loss_fn)
    t_plan = time.perf_counter() - t0
    # The captured graph without recompute: separates capture overhead from recompute cost.
    variants = {"unmodified": (model, None), "graph": (OptimizedModule(model, cap), None)}
    rows = []
    perblock = common.PerBlock(blocks)
    with perblock.active():
        pb = measure(model, example_inputs=inputs, loss_fn=loss_fn)
        pb_ret = retained_bytes(model, inputs, loss_fn)
    base_ret = retained_bytes(model, inputs, loss_fn)
    for frac in fractions:
        budget = int(non_act + frac * acts)
        t1 = time.perf_counter()
        try:
            plan = planner.plan(budget)
        except BudgetError as e:
            import re
            floor = re.search(r"lowest predicted peak with recomputation is ([0-9.]+ \w+)", str(e))
            rows.append((frac, budget, None, floor.group(1) if floor else "?"))
            continue
        dt_plan = time.perf_counter() - t1
        gmodel = OptimizedModule(model, cap, plan.gm)
        m = measure(gmodel, example_inputs=inputs, loss_fn=loss_fn)
        variants[f"memfit {frac:.0%}"] = (gmodel, None)
        rows.append((frac, budget, (m, retained_bytes(gmodel, inputs, loss_fn), plan, dt_plan), None))
    compiled = {}
    if use_compile:
        import torch._functorch.config as fconf
        for frac in fractions:
            torch._dynamo.reset()
            cm = copy.deepcopy(model)
            cparams = [p for p in cm.parameters() if p.requires_grad]
            with fconf.patch(activation_memory_budget=frac):
                c = torch.compile(cm)
                common.step_time(c, inputs, loss_fn, cparams)       # compile outside the measurement
                mc = measure(c, example_inputs=inputs, loss_fn=loss_fn)
                ret = retained_bytes(c, inputs, loss_fn)
                ts = [common.step_time(c, inputs, loss_fn, cparams) for _ in range(repeats)]
            compiled[frac] = (mc, ret, statistics.median(ts))
    runs = {k: functools.partial(common.step_time, fn, inputs, loss_fn, params) for k, (fn, _) in variants.items()}

    def per_block_step():
        with perblock.active():
            return common.step_time(model, inputs, loss_fn, params)

    runs["per-block"] = per_block_step
    timing = common.alternated(runs, repeats)
    med, ratio = timing.median, timing.ratio
    cells = [["-", "captured graph, no recompute", "-", "-", "-", "-", f"{ratio['graph']:.2f}", 0, "-"],
             ["-", f"torch.utils.checkpoint per block ({len(blocks)})", "-", format_bytes(pb.peak_bytes), "-",
              format_bytes(pb_ret), f"{ratio['per-block']:.2f}", len(blocks), "-"]]
    for frac, budget, res, err in rows:
        if res is None:
            cells.append([f"{frac:.0%}", "memfit", format_bytes(budget), "-", f"BudgetError (floor {err})",
                          "-", "-", "-", "-"])
            continue
        m, ret, plan, dtp = res
        cells.append([f"{frac:.0%}", "memfit", format_bytes(budget), format_bytes(m.peak_bytes),
                      "yes" if m.peak_bytes <= budget else "NO", format_bytes(ret),
                      f"{ratio[f'memfit {frac:.0%}']:.2f}", len(plan.spans), f"{dtp:.1f}"])
        if frac in compiled:
            mc, retc, tc = compiled[frac]
            cells.append([f"{frac:.0%}", f"torch.compile budget={frac}", "-", format_bytes(mc.peak_bytes),
                          "yes" if mc.peak_bytes <= budget else "no", format_bytes(retc),
                          f"{tc / med['unmodified']:.2f}", "-", "-"])
    head = (f"\n### {name}: unmodified peak {format_bytes(base.peak_bytes)}, saved activations "
            f"{format_bytes(acts)}, retained {format_bytes(base_ret)}, step {med['unmodified'] * 1e3:.1f} ms "
            f"(planning: {t_plan:.1f} s analysis + per budget below)\n")
    return head + "\n" + common.table(["budget (of activations)", "variant", "budget bytes", "measured peak", "fits",
                                       "retained", "step time ratio", "regions", "plan s"], cells)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2_like,vit_like,resnet_like,hf_gpt2,hf_bert")
    ap.add_argument("--fractions", default="0.75,0.5,0.25")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also torch.compile with activation_memory_budget")
    args = ap.parse_args()
    torch.set_num_threads(2)
    fracs = [float(f) for f in args.fractions.split(",")]
    print(common.machine())
    for name in args.models.split(","):
        print(run_model(name, fracs, args.repeats, args.compile), flush=True)


if __name__ == "__main__":
    main()
