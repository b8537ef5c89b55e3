"""The planner memfit.optimize runs: which techniques, in which order, to meet a budget.

1. Structural passes allowed by `techniques` (memfit.planning.techniques): the exact ones
   (fuse-conv-bn, sdpa-attention) and, when named, reversible coupling; each is kept only if
   it changed the graph and is priced by re-running the analysis (a Decision with the
   predicted bytes saved at the peak).
2. Over budget, the loss first: the output projection and its cross-entropy in chunks
   (chunked-ce, exact; one more matmul of the projection), kept if it lowers the peak. Then,
   when named (it constrains the training loop), the optimizer step in backward (exact: each
   parameter updated and its gradient freed as soon as it is accumulated; `ctx.optimizer`
   becomes the StepInBackward the user gets back).
3. Then a ladder of (optimizer state, activations) pairs, the first that fits taken (RUNGS):
   the state as given with recompute alone (exact: CheckpointPlanner, the fastest frontier
   plan that fits); on CUDA, when named (`techniques=[..., "offload"]`), the state as given
   with offloaded saved activations (exact; the shortest prefix of tensors, as for 8 bits
   below, priced by the measured host-device bandwidth); 8-bit optimizer states with
   recompute alone (then, on CUDA, with offload); the state as given with
   8-bit saved activations; 8-bit states with 8-bit saved activations; 4-bit states with
   recompute alone, then with 8-bit saved activations. Low-bit states (torchao's Adam/AdamW,
   memfit.runtime.lowbit; approximate) come first among the approximate options because
   their error stays in the update and does not reach the gradients; 4-bit last, the
   coarsest. A low-bit state is offered only when it lowers the predicted peak (its step's
   scratch is probed, and on some devices outweighs the state it saves); where it fits
   without recompute, nothing else is done. "8-bit saved activations" is: 8 bits on the
   graph alone, else on up to 6 frontier recompute plans (fastest first) with the tensors
   left outside recomputed regions quantized. On each graph, 8 bits on every eligible saved
   tensor is simulated first; where that fits, only the shortest prefix of tensors ranked by
   bytes saved that still meets the budget is quantized
   (memfit.planning.quantize.select_quantized). The refusal's floor is the lowest peak over
   every rung tried, the same at every budget below it.

Every rung aims at the budget less MARGIN (0.2%, planning/checkpoint.py, where the measured
errors it covers are given), and a refusal's "a budget of at least X" is the least budget some
rung meets with that margin (`BudgetError.least_budget`; `optimize(..., on_unmet="lowest")`
plans for it instead of raising).

Quantization runs after checkpointing, so it wraps only what stays saved: inside a
recomputed region nothing is kept, and quantizing there would only add work.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from memfit.budget import format_bytes
from memfit.errors import BudgetError, PassError
from memfit.planning.gradients import fused_step, fused_variant, sparse_embedding_grad
from memfit.planning.techniques import EXACT_STRUCTURAL, TECHNIQUES

log = logging.getLogger(__name__)

# applied before planning, in this order, when allowed (token merging is a source rewrite,
# applied before capture: memfit.api)
STRUCTURAL = EXACT_STRUCTURAL + ("reversible",)


def structural(cap, gm, peak: int, allowed, ctx, *, verify: bool = False):
    """Run each allowed structural pass on `gm` in place; keep it only where it changed the
    graph. Returns (gm, new predicted peak, decisions)."""
    from memfit.cost_models.memory import analyze_step
    from memfit.memory_plan import Decision
    from memfit.passes.infra.manager import PassManager
    from memfit.passes.infra.registry import get_pass

    decisions = []
    for t in STRUCTURAL:
        if t not in allowed:
            continue
        try:
            p = get_pass(TECHNIQUES[t])()
        except Exception as e:  # noqa: BLE001 - a missing optional pass is skipped, said why
            log.info("technique %s skipped: %s", t, e)
            continue
        res = PassManager([p], verify=verify).run(gm, ctx)
        if not res.modified:
            continue
        gm = res.gm
        new_peak = analyze_step(dataclasses.replace(cap, gm=gm), optimizer=ctx.optimizer, loss_fn=ctx.loss_fn,
                                symbolic=False).peak_bytes
        counts = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in res.stats.items())
        decisions.append(Decision(target="(model)", action=p.name, saved_bytes=peak - new_peak,
                                  extra_time_s=0.0, detail=counts))
        peak = new_peak
    return gm, peak, decisions


def fit_budget(cap, gm, budget_bytes: int, peak: int, allowed, ctx, *, verify: bool = False,
               time_model: str = "measured"):
    """Meet `budget_bytes` (module doc, step 2). Returns (gm, decisions); BudgetError with the
    floor and what would lower it when no plan fits. May set `ctx.optimizer` (the optimizer
    the user gets back: stepping in backward, low-bit states)."""
    from memfit.passes.infra.registry import get_pass

    from memfit.planning.checkpoint import MARGIN

    decisions: list = []
    entry_peak = peak
    # every plan chosen here keeps MARGIN of the budget free (the recompute planner inside)
    target = int(budget_bytes * (1.0 - MARGIN))
    if "chunked_ce" in allowed:
        gm, peak, decisions = _chunked_loss(cap, gm, peak, ctx, verify)
        if peak <= target:
            return gm, decisions
    if "sparse_embedding_grad" in allowed:
        gm, peak, more = sparse_embedding_grad(cap, gm, peak, ctx, verify)
        decisions += more
        if peak <= target:
            return gm, decisions
    if "step_in_backward" in allowed:
        peak, more = fused_step(cap, gm, peak, ctx)
        decisions += more
        if peak <= target:
            return gm, decisions
    q = None
    if "quantize" in allowed:
        try:
            q = get_pass(TECHNIQUES["quantize"])()
        except PassError as e:
            log.info("technique quantize skipped: %s", e)
    notes: list = []
    off = None
    if "offload" in allowed:
        dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
        if offload_saves_memory(dev):
            off = get_pass(TECHNIQUES["offload"])()
        else:
            notes.append(f"offload: needs a CUDA device (on {dev.type} the host memory is the memory the "
                         "budget counts)")
    saves = {"quantize": q, "offload": off}
    floors: list[tuple[int, int]] = []       # (lowest predicted peak, smallest budget met) per rung
    first_error = None
    # the ladder with the optimizer as it is, then (step_in_backward allowed, not taken above
    # because it did not lower the peak yet) again with the step in backward: the rungs move the
    # peak from the saved activations to the optimizer step, where it pays
    variants = [(ctx, peak, None)]
    states = {}
    for k in range(2):
        if k == 1:
            fv = fused_variant(cap, gm, ctx) if "step_in_backward" in allowed else None
            if fv is None:
                break
            variants.append(fv)
        vctx, vpeak, vdecision = variants[k]
        pre = decisions + ([vdecision] if vdecision is not None else [])
        states, more_notes = _state_options(cap, gm, vpeak, vctx, allowed)
        notes += [n for n in more_notes if n not in notes]
        planners: dict = {}
        for bits, how in RUNGS:
            if bits not in states or (how is not None and saves[how] is None) or (
                    how is None and "checkpoint" not in allowed and bits is None):
                continue
            opt, state_peak, state_decisions = states[bits]
            c = dataclasses.replace(vctx, optimizer=opt)
            if state_peak <= target:
                ctx.optimizer = opt
                return gm, pre + state_decisions
            planner = planners.get(bits)
            if planner is None and "checkpoint" in allowed:
                from memfit.planning.checkpoint import CheckpointPlanner
                planner = planners[bits] = CheckpointPlanner(dataclasses.replace(cap, gm=gm), optimizer=opt,
                                                             loss_fn=ctx.loss_fn, time_model=time_model)
            if how is None:
                if planner is None:
                    continue
                try:
                    cp = planner.plan(budget_bytes)
                except BudgetError as e:
                    first_error = first_error or e
                    floors.append((planner.floor_bytes(), planner.min_budget_bytes()))
                    continue
                ctx.optimizer = opt
                return cp.gm, pre + state_decisions + list(cp.decisions)
            found, best = _rewritten_saves(cap, gm, target, state_peak, c, saves[how], planner, verify)
            floors.append(best)
            if found is not None:
                ctx.optimizer = opt
                return found[0], pre + state_decisions + found[1]
    if peak <= budget_bytes:
        # within the budget but not its margin, and nothing went lower: the prediction still fits
        return gm, decisions
    if not floors:
        if first_error is not None:
            raise first_error
        raise BudgetError(f"predicted peak {format_bytes(peak)} exceeds the budget {format_bytes(budget_bytes)} "
                          f"and none of 'checkpoint', 'quantize' and (on CUDA) 'offload' is among the allowed "
                          f"techniques {list(allowed)}" + "".join(f". Not used: {n}" for n in notes))
    # a budget over the peak as it stands plans too (nothing more to do; with the margin, as
    # every rung): the least budget stated is never above it
    from memfit.planning.checkpoint import least_budget
    best, needed = min(peak, *(f[0] for f in floors)), min(least_budget(peak), *(f[1] for f in floors))
    used = (["recomputation"] if "checkpoint" in allowed else []) + (
        ["offloaded saved activations"] if off is not None else []) + (
        ["8-bit saved activations"] if q is not None else []) + [
        f"{b}-bit optimizer states" for b in states if b is not None]
    used = ", ".join(used[:-1]) + (" and " if len(used) > 1 else "") + used[-1]
    raise BudgetError(
        f"the budget {format_bytes(budget_bytes)} cannot be met: the lowest predicted peak with "
        f"{used} is {format_bytes(best)} (before them {format_bytes(entry_peak)}). What would lower "
        f"it: 4- or 2-bit activations (passes='quantize-activations{{bits=4}}'), a smaller batch or "
        f"sequence, {_more_hint(ctx, allowed)}or a budget of at least {format_bytes(needed, up=True)}."
        + "".join(f" Not used: {n}." for n in notes)
        + (f" Recompute alone: {first_error}" if first_error and len(floors) == 1 else ""),
        least_budget=needed)


def offload_saves_memory(device: torch.device) -> bool:
    """Whether host copies leave the memory a budget on `device` counts (CUDA: yes)."""
    return device.type == "cuda"


# The ladder (module doc): (optimizer-state bits or None for the state as given, what is done to
# the saved tensors left outside recomputed regions: None, "offload" (CUDA), "quantize"), tried
# in this order.
RUNGS = ((None, None), (None, "offload"), (8, None), (8, "offload"), (None, "quantize"), (8, "quantize"),
         (4, None), (4, "quantize"))


def _state_options(cap, gm, peak: int, ctx, allowed):
    """{bits: (optimizer, predicted peak on `gm`, decisions)} for the state as given (None) and
    each allowed low-bit state; and notes on why a low-bit state is not offered."""
    from memfit.cost_models.memory import analyze_step
    from memfit.runtime import lowbit

    out = {None: (ctx.optimizer, peak, [])}
    notes = []
    wanted = [b for b in lowbit.BITS if f"optimizer_{b}bit" in allowed]
    if not wanted:
        return out, notes
    why = _low_bit_why_not(ctx.optimizer) or lowbit.available()
    if why is not None:
        notes.append(f"optimizer states in {'/'.join(map(str, wanted))} bits: {why}")
        return out, notes
    for bits in wanted:
        opt = _with_low_bit(ctx.optimizer, bits)
        a = analyze_step(dataclasses.replace(cap, gm=gm), optimizer=opt, loss_fn=ctx.loss_fn, symbolic=False)
        if a.peak_bytes >= peak:
            notes.append(f"{bits}-bit optimizer states would not lower the peak ({format_bytes(a.peak_bytes)}: "
                         "their step's scratch outweighs the state saved)")
            continue
        out[bits] = (opt, a.peak_bytes, [_state_decision(ctx.optimizer, opt, bits, peak - a.peak_bytes)])
    return out, notes


def _low_bit_why_not(opt) -> str | None:
    from memfit.runtime import lowbit
    from memfit.runtime.optim import StepInBackward

    return lowbit.why_not(opt.as_plain() if isinstance(opt, StepInBackward) else opt)


def _with_low_bit(opt, bits: int):
    """`opt` with `bits`-bit states (stepping in backward still, when it did)."""
    from memfit.runtime import lowbit
    from memfit.runtime.optim import StepInBackward

    if isinstance(opt, StepInBackward):
        return StepInBackward(lowbit.to_low_bit(opt.as_plain(), bits))
    return lowbit.to_low_bit(opt, bits)


def _state_decision(given, opt, bits: int, saved: int):
    from memfit.cost_models.lowbit import step_scratch_bytes
    from memfit.cost_models.roofline import DeviceSpec
    from memfit.memory_plan import Decision
    from memfit.runtime.optim import StepInBackward

    inner = opt.as_plain() if isinstance(opt, StepInBackward) else opt
    src = given.as_plain() if isinstance(given, StepInBackward) else given
    params = [p for g in inner.param_groups for p in g["params"] if p.requires_grad]
    # roofline: the step's fp32 temporaries written and read once more than an fp32 step's
    scratch = sum(step_scratch_bytes(inner, p) for p in params)
    dev = params[0].device if params else torch.device("cpu")
    extra = 2 * scratch / DeviceSpec.for_device(dev).bytes_per_s
    return Decision("(optimizer state)", f"optimizer-{bits}bit", saved, extra,
                    f"{type(src).__name__} -> torchao {type(inner).__name__}: Adam's moments block-wise "
                    f"quantized to {bits} bits (approximate); the first step compiles torchao's update for "
                    f"{len({tuple(p.shape) for p in params})} parameter shape(s)")


def _more_hint(ctx, allowed) -> str:
    from memfit.runtime import lowbit

    hints = []
    if "step_in_backward" not in allowed and isinstance(ctx.optimizer, torch.optim.Optimizer):
        hints.append("the optimizer step in backward (technique 'step_in_backward', if the loop does not "
                     "clip or accumulate gradients)")
    missing = [b for b in lowbit.BITS if f"optimizer_{b}bit" not in allowed]
    if missing and lowbit.why_not(ctx.optimizer) is None:
        hints.append(f"{'/'.join(map(str, missing))}-bit optimizer states (technique "
                     f"{', '.join(repr(f'optimizer_{b}bit') for b in missing)})")
    return "".join(h + ", " for h in hints) + "a lighter optimizer, "


def _rewritten_saves(cap, gm, budget_bytes: int, peak: int, ctx, q, planner, verify: bool):
    """Pass `q`'s rewrite of saved activations (8-bit, or offloaded to host) on `gm` alone,
    then on frontier checkpoint plans (module doc):
    ((gm, decisions) or None, (the lowest peak seen, the smallest budget met)). `budget_bytes`
    is the target (the budget less the margin); the smallest budget met includes it."""
    from memfit.planning.checkpoint import least_budget
    from memfit.ir.fx_utils import copy_graph_module
    from memfit.memory_plan import Decision
    from memfit.planning.quantize import select_quantized

    def pass_ctx(g):
        return dataclasses.replace(ctx, captured=dataclasses.replace(cap, gm=g), history=[])

    def decision(target, ch, before):
        return Decision(target, q.to_text(), before - ch.peak, ch.extra_time_s, ch.detail())

    # The pass rewrites in place, so every trial gets a fresh graph.
    ch = select_quantized(q, lambda: copy_graph_module(gm), budget_bytes, peak, cap, pass_ctx,
                          ctx.optimizer, ctx.loss_fn, verify=verify)
    if ch.fits:
        return (ch.gm, [decision("(model)", ch, peak)]), (ch.peak, least_budget(ch.peak))
    best = ch.peak
    if planner is not None:
        frontier = [p for p in planner.frontier if p.spans]
        # At most 6 checkpoint plans, spread over the frontier from the fastest plan to the
        # floor; for each, 8 bits on everything that stays saved first, and the shortest
        # prefix of tensors only on the first plan where that fits.
        picks = sorted({round(i * (len(frontier) - 1) / 5) for i in range(6)}) if frontier else []
        for i in picks:
            spans, sel, nest = frontier[i].spans, frontier[i].selective, frontier[i].nested
            ck_peak, _ = planner.simulate(spans, sel, nest)
            if ck_peak <= budget_bytes:
                # recompute alone fits by its simulated peak (the planner's figure, which also
                # takes a lower bound into account, was above the budget): nothing to rewrite
                return ((planner.fresh_graph(spans, sel, nest), planner.decisions_for(spans, sel, nest)),
                        (ck_peak, least_budget(ck_peak)))
            ch = select_quantized(q, lambda spans=spans, sel=sel, nest=nest: planner.fresh_graph(spans, sel, nest),
                                  budget_bytes,
                                  ck_peak, cap, pass_ctx, ctx.optimizer, ctx.loss_fn, verify=verify)
            best = min(best, ch.peak)
            if ch.fits:
                return (ch.gm, planner.decisions_for(spans, sel, nest) + [decision("(outside recomputed regions)", ch,
                                                                               ck_peak)]), (ch.peak, least_budget(ch.peak))
        # recompute alone can go lower than with 8-bit; the planner keeps a margin free
        if planner.floor_bytes() < best:
            return None, (planner.floor_bytes(), planner.min_budget_bytes())
    return None, (best, least_budget(best))


def _chunked_loss(cap, gm, peak: int, ctx, verify: bool):
    """chunked-ce on `gm` when it lowers the predicted peak: (gm, peak, decisions)."""
    from memfit.cost_models.memory import analyze_step
    from memfit.memory_plan import Decision
    from memfit.passes.infra.manager import PassManager
    from memfit.passes.infra.registry import get_pass

    from memfit.ir.fx_utils import copy_graph_module

    p = get_pass(TECHNIQUES["chunked_ce"])()
    res = PassManager([p], verify=verify).run(copy_graph_module(gm), ctx)   # kept only if it helps
    if not res.modified:
        return gm, peak, []
    a = analyze_step(dataclasses.replace(cap, gm=res.gm), optimizer=ctx.optimizer, loss_fn=ctx.loss_fn,
                     symbolic=False)
    if a.peak_bytes >= peak:
        return gm, peak, []
    extra = _projection_time_s(res.gm)
    n = res.stats.get(f"{p.name}.rewritten", 0)
    return res.gm, a.peak_bytes, [Decision("(loss)", p.name, peak - a.peak_bytes, extra,
                                           f"{n} output projection(s) + cross-entropy in chunks of rows")]


def _projection_time_s(gm) -> float:
    """Predicted extra time: the projection's matmul once more (logits recomputed in backward),
    2 * N * D * V FLOPs at the device's rate."""
    from memfit.cost_models.roofline import DeviceSpec
    from memfit.runtime.chunked_ce import chunked_linear_cross_entropy

    dev = next((q.device for q in gm.parameters()), torch.device("cpu"))
    flops = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is chunked_linear_cross_entropy:
            h, w = n.args[0].meta.get("val"), n.args[1].meta.get("val")
            if isinstance(h, torch.Tensor) and isinstance(w, torch.Tensor):
                rows = h.numel() // h.shape[-1]
                flops += 2 * int(rows) * int(w.shape[0]) * int(w.shape[1])
    return flops / DeviceSpec.for_device(dev).flops_per_s


# r per block tried for token merging under a budget: ToMe's paper runs r up to about 16 on
# ViT-B/16's 197 tokens; larger r is clamped by the runtime to the tokens there are
R_CANDIDATES = (1, 2, 4, 6, 8, 12, 16, 24, 32)


def token_merge_for(model, example_inputs, example_kwargs, peak: int, budget_bytes, optimizer, loss_fn,
                    data_parallel=None):
    """Token merging when named (it changes the function): with a budget, the smallest r of
    R_CANDIDATES whose merged step's predicted peak meets the budget less MARGIN by itself
    (first_fit over r, the peak falling as r grows), else the largest (the other techniques go
    on from there); without one, the pass's default r. Returns (capture or None when nothing
    was merged, new peak, decisions)."""
    from memfit.cost_models.memory import analyze_step
    from memfit.ir.capture import capture
    from memfit.memory_plan import Decision
    from memfit.passes.infra.pipeline import apply_rewrites
    from memfit.passes.infra.registry import get_pass
    from memfit.planning.checkpoint import MARGIN
    from memfit.planning.solvers.search import first_fit

    tm = get_pass(TECHNIQUES["token_merge"])
    tried: dict = {}

    def merged(r):
        if r not in tried:
            rewritten, res, meta = apply_rewrites(model, [tm() if r is None else tm(r=r)], example_inputs,
                                                  example_kwargs)
            if not res.modified:
                tried[r] = (None, peak, res)
            else:
                cap = capture(rewritten, example_inputs, example_kwargs, dynamic=False)
                cap.data_parallel = data_parallel
                cap.gm.meta.update(meta)
                tried[r] = (cap, analyze_step(cap, optimizer=optimizer, loss_fn=loss_fn, symbolic=False).peak_bytes,
                            res)
        return tried[r]

    why = "the pass's default r"
    r = None
    if budget_bytes is not None and peak > budget_bytes:
        target = int(budget_bytes * (1.0 - MARGIN))
        fit = first_fit(len(R_CANDIDATES), lambda i: merged(R_CANDIDATES[i])[1], target,
                        max_evals=len(R_CANDIDATES))
        if fit.index is not None:
            r, why = R_CANDIDATES[fit.index], "the smallest r tried that meets the budget by itself"
        else:
            r, why = R_CANDIDATES[-1], "no r tried meets the budget by itself: the largest, then the other techniques"
    cap, new_peak, res = merged(r)
    if cap is None:
        return None, peak, []
    counts = ", ".join(f"{k.split('.', 1)[-1]}={v}" for k, v in res.stats.items())
    return cap, new_peak, [Decision(target="(model)", action=TECHNIQUES["token_merge"], saved_bytes=peak - new_peak,
                                    extra_time_s=0.0, detail=f"{counts}; r={'default' if r is None else r}: {why}")]

