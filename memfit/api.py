"""Public entry points: plan(), optimize(), optimize_()."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from memfit.budget import Budget
from memfit.ir.capture import capture
from memfit.cost_models.memory import analyze_step
from memfit.cost_models.optimizers import bind_targets
from memfit.runtime.optim import StepInBackward
from memfit.errors import BudgetError, MemfitError
from memfit.memory_plan import Decision, MemoryPlan, downsample_timeline, module_rows

log = logging.getLogger(__name__)


def plan(model: torch.nn.Module, budget=None, *, example_inputs=(), example_kwargs: dict | None = None,
         example_targets=(), optimizer=None, loss_fn: Callable | None = None, capture_method: str = "auto",
         symbolic: bool = True, data_parallel: str | None = None, world_size: int | None = None,
         budget_of: str = "allocated") -> MemoryPlan:
    """Predict the memory of one training step of `model` (forward, backward, optimizer step).

    Nothing is computed for real: the step runs on FakeTensors. `budget` (bytes, "6GiB",
    "50%") is compared with the predicted peak, and the plan gives the largest batch size
    that fits it. See MemoryPlan for what the plan holds.

    `symbolic`: keep batch size B and sequence length T symbolic, so the plan gives bytes as
    expressions in them and the largest batch that fits. False is faster (GPT-2-small:
    about 2 s instead of 7 s on a 2-core CPU) and gives the same bytes at the example size.

    The loss: `loss_fn(output, *example_targets)`, or `loss_fn(output)` closing over real
    tensors (labels), or by default the model's own `output.loss` (Hugging Face models given
    `labels=` in example_kwargs) or the mean of its first float output. Targets given as
    `example_targets` scale with the batch size in the plan; tensors a closure holds keep
    their size.

    `data_parallel="ddp"`: the model will train inside DistributedDataParallel; each rank's
    plan then holds DDP's gradient buckets (a copy of every gradient). Per rank: give the
    per-rank batch. `data_parallel="fsdp"`: the model will be sharded by memfit.fully_shard over
    `world_size` ranks (default: the initialized process group's size); the plan is one rank's.

    On CUDA the plan also simulates PyTorch's caching allocator over a few steps
    (memfit.cost_models.cuda_allocator): `budget_of="allocated"` (default) bounds
    torch.cuda.max_memory_allocated, blocks rounded as the allocator rounds them;
    `budget_of="reserved"` bounds torch.cuda.max_memory_reserved, the segments it holds (what
    must fit on the device).
    """
    loss_fn = bind_targets(loss_fn, example_targets)
    budget_obj = Budget.parse(budget) if budget is not None else None
    cap = capture(model, example_inputs, example_kwargs, method=capture_method, dynamic=symbolic)
    cap.data_parallel = _data_parallel(data_parallel)
    if data_parallel == "fsdp":
        set_fsdp(cap, model, world_size)
    return plan_captured(cap, budget_obj, optimizer=optimizer, loss_fn=loss_fn, symbolic=symbolic,
                         budget_of=budget_of)


DATA_PARALLEL = (None, "ddp", "fsdp")
# what a graph sharded by memfit.fully_shard can run (memfit.ir.fsdp.refused_technique says why
# the others cannot); under data_parallel="fsdp" the default techniques are these
FSDP_TECHNIQUES = ("fuse_conv_bn", "sdpa", "chunked_ce", "sparse_embedding_grad", "checkpoint", "token_merge")


def _data_parallel(value):
    if value not in DATA_PARALLEL:
        raise ValueError(f"data_parallel={value!r}: choose None (one process), 'ddp' (DistributedDataParallel) "
                         "or 'fsdp' (FSDP2, then memfit.fully_shard)")
    return value


def set_fsdp(cap, model, world_size) -> None:
    """Captured.fsdp_units and world_size for a plan of `model` under FSDP2."""
    from memfit.ir.fsdp import default_units

    cap.fsdp_units = default_units(model)
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if int(world_size) < 1:
        raise ValueError(f"world_size={world_size!r}: give the number of ranks FSDP2 shards over (1 or more)")
    cap.world_size = int(world_size)


def plan_captured(cap, budget: Budget | None, *, optimizer=None, loss_fn=None, symbolic=True,
                  decisions=(), extra_time_s: float = 0.0, baseline_peak: int | None = None,
                  budget_of: str = "allocated") -> MemoryPlan:
    """Plan for an already captured model (passes reuse the capture)."""
    a = analyze_step(cap, optimizer=optimizer, loss_fn=loss_fn, symbolic=symbolic)
    check_budget_of(budget_of, a)
    budget_bytes = None
    if budget is not None:
        budget_bytes = budget.resolve(baseline_peak if baseline_peak is not None else device_peak(a, budget_of))
    device = "cpu"
    for p in cap.gm.parameters():
        device = str(p.device)
        break
    opt_name = optimizer if isinstance(optimizer, (str, type(None))) else type(optimizer).__name__
    if isinstance(optimizer, StepInBackward):
        opt_name = f"{optimizer.inner_class.__name__} (step in backward)"
    return MemoryPlan(
        model=cap.model_name, device=device, capture_method=cap.method, optimizer=opt_name,
        peak_bytes=a.peak_bytes, peak_phase=a.peak_phase, categories=dict(a.totals),
        peak_breakdown=dict(a.peak_breakdown), budget=str(budget) if budget is not None else None,
        budget_bytes=budget_bytes, symbols=dict(a.symbols), peak_expr=str(a.peak_expr),
        saved_expr=str(a.saved_expr),
        max_batch=a.max_batch(budget_bytes) if budget_bytes is not None else None,
        flops=a.flops, modules=module_rows(a.nodes.values()), decisions=tuple(decisions),
        predicted_extra_time_s=extra_time_s, timeline=downsample_timeline(a.timeline),
        notes=tuple(cap.notes) + tuple(a.notes), allocator=a.allocator, budget_of=budget_of)


BUDGET_OF = ("allocated", "reserved")
REFITS = 3      # plans again for a lowered budget, at most, when the allocator's peak is over


def refit_targets(budget_bytes, last_plan):
    """The budgets to plan for, in turn: `budget_bytes`, then, while the plan just made
    (`last_plan()`) is over its budget only by what the caching allocator adds (block rounding,
    cached segments: MemoryPlan.device_peak_bytes above peak_bytes), the target lowered by that
    excess, at most REFITS times. Elsewhere there is one target."""
    target = budget_bytes
    yield target
    for _ in range(REFITS):
        p = last_plan()
        if target is None or p is None or not p.allocator or p.fits is not False:
            return
        target -= p.device_peak_bytes - budget_bytes
        if target <= 0:
            return
        log.info("memfit: the caching allocator's %s peak is %d B over the budget; planning again for %d B",
                 p.budget_of, p.device_peak_bytes - budget_bytes, target)
        yield target


def check_budget_of(budget_of: str, analysis) -> None:
    """budget_of is one of BUDGET_OF, and "reserved" only where a caching allocator reserves."""
    if budget_of not in BUDGET_OF:
        raise ValueError(f"budget_of={budget_of!r}: choose 'allocated' (torch.cuda.max_memory_allocated, the "
                         "default) or 'reserved' (torch.cuda.max_memory_reserved, what the CUDA caching allocator "
                         "holds)")
    if budget_of == "reserved" and analysis.allocator is None:
        why = next((n for n in analysis.notes if n.startswith("CUDA caching allocator")), None)
        raise ValueError("budget_of='reserved' bounds the CUDA caching allocator's reserved memory, "
                         + (f"which is not predicted here: {why}" if why else
                            "and this step does not run on a CUDA device (its memory is not cached): use "
                            "budget_of='allocated'"))


def device_peak(analysis, budget_of: str = "allocated") -> int:
    """The peak a budget bounds (MemoryPlan.device_peak_bytes) for a StepAnalysis."""
    from memfit.cost_models.cuda_allocator import bounded_peak

    return bounded_peak(analysis.peak_bytes, analysis.allocator, budget_of)


def check_budget(plan_: MemoryPlan) -> None:
    """Raise BudgetError when the plan's peak exceeds its budget."""
    if plan_.fits is False:
        from memfit.budget import format_bytes as fb
        what = (f"the CUDA caching allocator's predicted {plan_.budget_of} peak "
                f"{fb(plan_.device_peak_bytes)} (the step's own: {fb(plan_.peak_bytes)})"
                if plan_.device_peak_bytes != plan_.peak_bytes else f"predicted peak {fb(plan_.peak_bytes)}")
        raise BudgetError(f"{what} exceeds the budget {plan_.budget} ({fb(plan_.budget_bytes)})")


# ----------------------------------------------------------------------------- optimize

from memfit.planning.techniques import DEFAULT_TECHNIQUES, FUNCTION_CHANGING, TECHNIQUES  # noqa: E402,F401


def optimize(model: torch.nn.Module, budget=None, *, example_inputs=(), example_kwargs: dict | None = None,
             example_targets=(), optimizer=None, loss_fn: Callable | None = None, techniques=None, passes=None,
             mode: str = "train", verify: bool = False, on_unmet: str = "raise", time_model: str = "measured",
             data_parallel: str | None = None, world_size: int | None = None, budget_of: str = "allocated"):
    """Rewrite `model` so one training step fits `budget`; returns a new module sharing its
    parameters (same state_dict keys and tensors), with the plan as `.memfit_plan`.

    budget: bytes, "6GiB", "800MB", or "50%" of the unoptimized step's predicted peak; None
    applies only the exact structural passes. techniques: which the planner may use (see
    memfit.planning.techniques; default: exact ones plus 8-bit quantization, which is used only
    when the exact ones cannot meet the budget). passes: an explicit pipeline (text form or Pass
    objects), bypassing the planner. verify: check numerics after every pass (PassManager verify
    mode). time_model: how recompute is priced, "measured" (default: a short profile of the
    forward on the example inputs, memfit.cost_models.timing) or "roofline" (nominal rates, no
    run). data_parallel: "ddp" when the result will be wrapped in DistributedDataParallel: the
    budget is per rank and includes DDP's gradient buckets ('step_in_backward' is refused then:
    it would step on gradients not yet reduced). "fsdp" when the result will be sharded by
    memfit.fully_shard (FSDP2) over `world_size` ranks (default: the process group's): the
    budget is per rank, recomputed regions stay inside one FSDP unit, and only the techniques
    FSDP2 composes with are used (FSDP_TECHNIQUES). budget_of: on CUDA, "allocated" (default)
    bounds torch.cuda.max_memory_allocated, "reserved" torch.cuda.max_memory_reserved, both as
    the simulated caching allocator gives them (memfit.plan); a plan over it is planned again
    for a budget lowered by the excess.

    Order (memfit.planning.strategy): source rewrites (token merging, when named) before
    capture; structural passes (Conv+BN tune mode, SDPA, reversible coupling when named); then
    recompute chosen by the checkpoint planner; when recompute alone cannot reach the budget,
    quantized saved activations and recompute again. Raises BudgetError when nothing reaches
    the budget, with the floor and the least budget that would plan; with `on_unmet="lowest"`
    it plans for that least budget instead and says so (the plan's `fits` is False, and its
    notes give both budgets). The user's model is not modified.

    With an optimizer instance (any torch.optim class, mirrored exactly in the plan: groups,
    hyper-parameters, existing state) the result is `(module, optimizer)`, as IPEX and
    DeepSpeed return it; the optimizer already steps the module's parameters (they are the
    model's). Inputs of another shape or dtype than the example's (the smaller last batch of
    an epoch) are planned again on first sight, once per input signature, with the same budget
    in bytes; a loss closing over the example's labels that does not fit them is replaced by
    the default loss for that plan (logged).
    """
    if on_unmet not in ("raise", "lowest"):
        raise ValueError(f"on_unmet={on_unmet!r}: choose 'raise' (a BudgetError) or 'lowest' (the lowest plan)")
    om = _optimize(model, budget, example_inputs=example_inputs, example_kwargs=example_kwargs,
                   example_targets=example_targets, optimizer=optimizer, loss_fn=loss_fn, techniques=techniques,
                   passes=passes, mode=mode, verify=verify, on_unmet=on_unmet, time_model=time_model,
                   data_parallel=data_parallel, world_size=world_size, budget_of=budget_of)
    return (om, om.memfit_optimizer) if isinstance(optimizer, torch.optim.Optimizer) else om


def _optimize(model, budget, *, example_inputs, example_kwargs, example_targets, optimizer, loss_fn, techniques,
              passes, mode, verify, on_unmet="raise", time_model="measured", data_parallel=None,
              world_size=None, budget_of="allocated"):
    from memfit.ir.module import OptimizedModule
    from memfit.passes.infra.base import PassContext
    from memfit.passes.infra.pipeline import run_pipeline
    from memfit.passes.infra.registry import as_passes
    from memfit.planning.strategy import fit_budget, structural, token_merge_for
    from memfit.planning.techniques import OPTIMIZER_CHANGING, parse_techniques

    from memfit.planning.checkpoint import TIME_MODELS

    if time_model not in TIME_MODELS:
        raise ValueError(f"time_model={time_model!r}: choose 'measured' (a short profile of the forward) or "
                         "'roofline' (nominal rates)")
    if mode != "train":
        raise ValueError(f"mode={mode!r}: only mode='train' is supported (memory of a training step)")
    loss_fn = bind_targets(loss_fn, example_targets)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    budget_obj = Budget.parse(budget) if budget is not None else None
    allowed = parse_techniques(techniques)
    if _data_parallel(data_parallel) == "fsdp":
        if techniques is None:
            allowed = tuple(t for t in allowed if t in FSDP_TECHNIQUES)
        bad = [t for t in allowed if t not in FSDP_TECHNIQUES]
        if bad:
            raise ValueError(f"technique(s) {', '.join(bad)} cannot run under FSDP2 (data_parallel='fsdp'): memfit "
                             f"composes {', '.join(FSDP_TECHNIQUES)} with it (docs/distributed.md); leave them out")
    if data_parallel == "ddp" and "step_in_backward" in allowed:
        raise ValueError("technique 'step_in_backward' cannot train under data_parallel='ddp': each parameter "
                         "would be stepped on its own rank's gradient, before DDP reduces it; leave it out")
    cap = capture(model, example_inputs, example_kwargs, dynamic=False)
    cap.data_parallel = data_parallel
    if data_parallel == "fsdp":
        set_fsdp(cap, model, world_size)
    base = analyze_step(cap, optimizer=optimizer, loss_fn=loss_fn, symbolic=False)
    check_budget_of(budget_of, base)
    base_peak = device_peak(base, budget_of)
    budget_bytes = budget_obj.resolve(base_peak) if budget_obj is not None else None
    decisions: list = []
    unmet = None                 # the note of a plan made for a lower budget (on_unmet="lowest")

    if passes is not None:
        cap, res = run_pipeline(model, example_inputs, example_kwargs, passes, budget=budget_bytes,
                                optimizer=optimizer, loss_fn=loss_fn, verify=verify, captured=cap)
        decisions += res.decisions   # what the passes chose, then their counts
        decisions += [Decision(target=k.split(".")[0], action=k.split(".", 1)[-1], saved_bytes=0, extra_time_s=0.0,
                               detail=f"{v}") for k, v in res.stats.items()]
    else:
        peak = base.peak_bytes
        if "token_merge" in allowed:
            merged, peak, more = token_merge_for(model, example_inputs, example_kwargs, peak, budget_bytes,
                                                 optimizer, loss_fn, data_parallel)
            cap = merged or cap
            if merged is not None and data_parallel == "fsdp":
                set_fsdp(cap, model, world_size)
            decisions += more
        ctx = PassContext(captured=cap, budget=budget_bytes, optimizer=optimizer, loss_fn=loss_fn)
        gm, peak, more = structural(cap, cap.gm, peak, allowed, ctx, verify=verify)
        decisions += more
        from memfit.budget import format_bytes as fb

        fitted, chosen = None, (gm, [], optimizer)
        for target in refit_targets(budget_bytes, lambda: None if unmet else fitted):
            fit_ctx = dataclasses.replace(ctx, budget=target, history=list(ctx.history))
            fit_gm, more, fit_opt = gm, [], optimizer
            if target is not None and peak > target:
                try:
                    fit_gm, more = fit_budget(cap, gm, target, peak, allowed, fit_ctx, verify=verify,
                                              time_model=time_model)
                except BudgetError as e:
                    if target != budget_bytes:      # lowered for the caching allocator's excess
                        excess = budget_bytes - target
                        if on_unmet == "lowest":
                            unmet = (f"on_unmet='lowest': the CUDA caching allocator's {budget_of} peak of the "
                                     f"plan exceeds the budget {fb(budget_bytes)}, and no plan for the budget less "
                                     f"that excess ({fb(target)}) exists; this is the lowest plan found")
                            break
                        raise BudgetError(
                            f"{e} (the budget {fb(budget_bytes)} less {fb(excess)}: what the CUDA caching "
                            f"allocator adds to the plan's {budget_of} peak)",
                            least_budget=None if e.least_budget is None else e.least_budget + excess) from e
                    if on_unmet != "lowest" or e.least_budget is None:
                        raise
                    fit_gm, more = fit_budget(cap, gm, e.least_budget, peak, allowed, fit_ctx, verify=verify,
                                              time_model=time_model)
                    unmet = (f"on_unmet='lowest': the budget {fb(budget_bytes)} cannot be met; planned for the "
                             f"least budget that can be, {fb(e.least_budget, up=True)}")
                fit_opt = fit_ctx.optimizer       # a StepInBackward when the planner fused the step
            fitted = plan_captured(dataclasses.replace(cap, gm=fit_gm), budget_obj, optimizer=fit_opt,
                                   loss_fn=loss_fn, symbolic=False, decisions=decisions + more,
                                   extra_time_s=sum(d.extra_time_s for d in decisions + more),
                                   baseline_peak=base_peak, budget_of=budget_of)
            chosen = (fit_gm, more, fit_opt)
        gm, more, optimizer = chosen
        decisions += more
        cap = dataclasses.replace(cap, gm=gm)
    extra = sum(d.extra_time_s for d in decisions)
    plan_ = fitted if passes is None else plan_captured(
        cap, budget_obj, optimizer=optimizer, loss_fn=loss_fn, symbolic=False, decisions=decisions,
        extra_time_s=extra, baseline_peak=base_peak, budget_of=budget_of)
    if unmet is not None:
        plan_ = dataclasses.replace(plan_, notes=(unmet,) + tuple(plan_.notes))
    else:
        check_budget(plan_)
    if passes is None:
        changed = any(d.action in {TECHNIQUES[t] for t in FUNCTION_CHANGING} for d in decisions)
    else:
        changed = any(p.promise.kind == "changes_function" for p in as_passes(passes))

    # `optimizer`: the one this plan hands back, which the user holds: the plans for other inputs
    # keep it (OPTIMIZER_CHANGING left out)
    kept = tuple(t for t in allowed if t not in OPTIMIZER_CHANGING)

    def replan(args, kwargs):
        again = dict(example_kwargs=kwargs, optimizer=optimizer, techniques=kept, passes=passes, mode=mode,
                     verify=verify, example_targets=(), on_unmet=on_unmet, time_model=time_model,
                     data_parallel=data_parallel, world_size=world_size, budget_of=budget_of)
        try:
            try:
                return _optimize(model, budget_bytes, example_inputs=args, loss_fn=loss_fn, **again)
            except MemfitError:
                raise
            except Exception as e:  # noqa: BLE001 - the loss was written for the example's labels
                if loss_fn is None:
                    raise
                log.info("memfit: the loss does not fit these inputs (%s: %s); planning them with the default "
                         "loss", type(e).__name__, e)
                return _optimize(model, budget_bytes, example_inputs=args, loss_fn=None, **again)
        except BudgetError as e:
            left = [t for t in allowed if t in OPTIMIZER_CHANGING]
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)) or "new inputs"
            raise BudgetError(
                f"planning again for inputs {shapes} (the example's were planned): {e}"
                + (f" This plan keeps the optimizer the first one returned, so it does not use {', '.join(left)}."
                   if left and optimizer is not None else "")) from e

    arm = None
    if isinstance(optimizer, StepInBackward):
        optimizer.install()
        arm = optimizer.arm
    om = OptimizedModule(model, cap, cap.gm, plan_, changes_function=changed, replan=replan, before_forward=arm)
    om.memfit_optimizer = optimizer
    return om


def optimize_(model: torch.nn.Module, budget=None, **kwargs):
    """In-place variant of optimize(): `model.forward` runs the rewritten graph from now on
    (the model object, its parameters and state_dict stay the same); returns `model`, or
    `(model, optimizer)` when given an optimizer instance (as optimize)."""
    import types

    res = optimize(model, budget, **kwargs)
    opt = res[0] if isinstance(res, tuple) else res
    # The optimized module is found through `self`, not a closure: copy.deepcopy(model) (an
    # EMA or teacher copy) then runs its own copy of the graph on its own parameters.
    model.__dict__["_memfit_optimized"] = opt
    model.forward = types.MethodType(_optimized_forward, model)
    model.memfit_plan = opt.memfit_plan
    return (model, res[1]) if isinstance(res, tuple) else model


def _optimized_forward(self, *args, **kwargs):
    return self.__dict__["_memfit_optimized"](*args, **kwargs)


class WithLoss(torch.nn.Module):
    """`model` and its loss as one module: forward(*inputs, *targets) -> loss_fn(model(*inputs),
    *targets). What memfit.with_loss returns; see there. Its forward has explicit parameters
    (input_0, ..., target_0, ...) so symbolic_trace can follow it too."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, n_inputs: int = 1, n_targets: int = 1):
        super().__init__()
        # The model's children, parameters and buffers under their own names (as
        # OptimizedModule does): state_dict keys stay the model's, and module paths in the
        # captured graph are the model's.
        object.__setattr__(self, "_memfit_model", model)
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, p in model.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in model.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.loss_fn, self.n_inputs, self.n_targets = loss_fn, n_inputs, n_targets
        self.training = model.training

    def __new__(cls, model=None, loss_fn=None, n_inputs: int = 1, n_targets: int = 1):
        # A subclass per arity, whose forward names each argument: fx cannot trace *args.
        key = (n_inputs, n_targets)
        sub = _WITH_LOSS_CLASSES.get(key)
        if sub is None:
            ins = [f"input_{i}" for i in range(n_inputs)]
            outs = [f"target_{j}" for j in range(n_targets)]
            src = (f"def forward(self, {', '.join(ins + outs)}):\n"
                   f"    return self._loss(({', '.join(ins)},), ({', '.join(outs)}{',' if outs else ''}))\n")
            scope: dict = {}
            exec(compile(src, f"<memfit.with_loss {key}>", "exec"), scope)  # noqa: S102 - a generated signature
            sub = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__})
            _WITH_LOSS_CLASSES[key] = sub
        return super().__new__(sub)

    def _loss(self, inputs, targets):
        model = self._memfit_model
        return self.loss_fn(type(model).forward(model, *inputs), *targets)


_WITH_LOSS_CLASSES: dict = {}


def with_loss(model: torch.nn.Module, loss_fn: Callable, n_inputs: int = 1, n_targets: int = 1) -> WithLoss:
    """Bring a loss computed outside the model into it, so memfit plans and rewrites it with the
    model: the output projection and its cross-entropy in chunks (logits never whole), the
    loss's bytes in the plan like any node.

        step = memfit.optimize(memfit.with_loss(model, loss_fn), "50%", example_inputs=(x, y))
        step(x, y).backward()        # loss_fn(model(x), y), in less memory

    `n_inputs`, `n_targets`: how many arguments are the model's, then the loss's. The module
    shares the model's parameters (same state_dict keys)."""
    return WithLoss(model, loss_fn, n_inputs, n_targets)
