"""Memory cost model: every byte one training step holds, predicted without real compute.

The step (forward, loss, backward, optimizer step) is executed on FakeTensors: shapes,
dtypes, strides and storage aliasing are exact, no data is computed and no memory is
taken. A dispatch mode on top of fake mode sees each operator's outputs; a weak reference
on each new storage tells when the allocation would be freed; `saved_tensors_hooks` tell
which storages autograd keeps for backward. So the timeline follows eager PyTorch's
reference counting, operator by operator, and each saved storage is attributed to the
graph node that allocated it.

Scratch buffers allocated and freed inside one kernel (oneDNN reorders, cuDNN workspaces)
are invisible on FakeTensors; they come from probes that run the real operator once
(memfit/cost_models/probes.py, cached on disk). Allocator rounding and fragmentation are not
modelled; the tests bound the resulting error against `memfit.measure` (DESIGN.md, "Truth").

Batch size (dim 0 of the inputs) and sequence length (dim 1 of integer 2-D inputs) are
symbolic (sympy) during the run, so every byte count is also an expression in B and T.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree

from memfit.cost_models import probes
from memfit.cost_models.optimizers import LossWithTargets, default_loss, make_optimizer  # noqa: F401 - also imported here
from memfit.cost_models.roofline import DeviceSpec
from memfit.cost_models.symbols import fake_inputs as _fake_inputs
from memfit.cost_models.symbols import rename as _rename
from memfit.cost_models.symbols import settle_symbols as _settle_symbols
from memfit.cost_models.tracker import _expr_and_hint, _sole_owner_counts, _Store, _Tracker
from memfit.errors import MemfitError
from memfit.ir.capture import Captured
from memfit.ir.fx_utils import fake_state, fetch_attr, module_path
from memfit.runtime.optim import StepInBackward

log = logging.getLogger(__name__)

CATEGORIES = ("parameters", "buffers", "inputs", "gradients", "optimizer_state",
              "saved_activations", "transient")
PHASES = ("start", "forward", "loss", "backward", "optimizer")
_PREEXISTING = ("parameters", "buffers", "inputs", "optimizer_state")


# ----------------------------------------------------------------------------- records

@dataclass
class NodeCost:
    """Per-node record written to node.meta['memfit'] (bytes, FLOPs, seconds)."""

    name: str
    module: str
    output_bytes: int = 0          # new storages the node allocates that it returns
    saved_bytes: int = 0           # of those and its internal ones, what autograd keeps
    flops: int = 0                 # forward FLOPs (multiply-add = 2)
    est_time_s: float = 0.0        # forward time estimate (roofline on DeviceSpec)
    saved_expr: Any = 0            # saved_bytes as a sympy expression in B (and T)
    kept_bytes: int = 0            # of its new storages, what a selective region keeps (outputs of
                                   # memfit.runtime.checkpoint.SAVED_OPERATORS: matmuls, attention)

    def to_dict(self) -> dict:
        return {"name": self.name, "module": self.module, "output_bytes": self.output_bytes,
                "saved_bytes": self.saved_bytes, "flops": self.flops, "est_time_s": self.est_time_s}


@dataclass
class StepAnalysis:
    """Result of one simulated training step."""

    nodes: dict[str, NodeCost]
    totals: dict[str, int]                     # bytes per category (see `totals` doc below)
    peak_bytes: int
    peak_breakdown: dict[str, int]             # live bytes per category at the peak
    peak_phase: str
    peak_node: str | None
    timeline: list[tuple[int, str, dict[str, int]]]   # (event index, phase, live per category)
    symbols: dict[str, int]                    # symbol name -> example value ("B": 8)
    peak_expr: Any                             # sympy expression of the peak in the symbols
    saved_expr: Any                            # total saved activations, sympy
    batch_line: list[tuple[int, int]] = field(default_factory=list)  # (intercept, slope) per event
    batch_nonlinear: bool = False
    flops: int = 0
    notes: list[str] = field(default_factory=list)
    allocator: dict | None = None              # CUDA: the caching allocator's peaks (cuda_allocator.predict)

    def max_batch(self, budget_bytes: int) -> int | None:
        """Largest batch size whose predicted peak fits `budget_bytes`, None if none does.

        Each event's live bytes are exactly intercept + slope * B (checked at three points
        when the line was built), so the answer is exact for this graph.
        """
        if "B" not in self.symbols or self.batch_nonlinear or not self.batch_line:
            return None
        best = None
        for a, s in self.batch_line:
            if s <= 0:
                if a > budget_bytes:
                    return None
                continue
            cap = (budget_bytes - a) // s
            best = cap if best is None else min(best, cap)
        if best is None:
            return None  # peak does not grow with batch size
        return int(best) if best >= 1 else None


# ----------------------------------------------------------------------------- simulation

def analyze_step(cap: Captured, *, optimizer=None, loss_fn: Callable | None = None,
                 symbolic: bool = True, device_spec: DeviceSpec | None = None,
                 on_save: Callable[[str, torch.Tensor, bool], None] | None = None,
                 forward_only: bool = False, node_times: dict | None = None) -> StepAnalysis | None:
    """Simulate one training step of `cap` on FakeTensors and return its memory profile.

    Writes a NodeCost into node.meta['memfit'] of every call node of `cap.gm`.
    `optimizer`: None (forward+backward only), a name, or an instance built on the model's
    parameters (mirrored on the fakes: the graph's parameters are the model's objects).

    The saved-tensor probe: `on_save(node name, tensor, preexisting)` is called for every
    tensor autograd saves in the forward, attributed to the graph node that saved it;
    `preexisting` is True for storages of parameters, buffers and inputs. With `forward_only`
    only the forward runs (no loss, backward, optimizer) and None is returned: what the
    quantize pass needs (memfit.passes.quantize.saved_tensors_by_node).

    `node_times`: measured forward seconds per node (memfit.cost_models.timing.profile_forward);
    NodeCost.est_time_s is then the measured time, and for nodes it lacks the roofline's,
    scaled by measured / roofline over the nodes it has. Without it: the roofline.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                       StatelessSymbolicContext)

    gm = cap.gm
    loss_fn = loss_fn or default_loss
    # Real tensors the loss closes over (labels) are converted where an operator reads them
    # and counted as inputs (the tracker); the graph's own inputs and state are fakes below.
    fm = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    tracker = _Tracker(fm.shape_env, fm, _device_of(cap.flat_inputs(), gm))

    # Parameters and buffers: static shapes, ties kept (tied embeddings count once).
    fakes = fake_state(gm, fm)
    param_fakes: list[torch.Tensor] = []
    param_real: list[torch.Tensor] = []
    seen: set[int] = set()
    named = [(n, t, "parameters") for n, t in gm.named_parameters(remove_duplicate=False)]
    named += [(n, t, "buffers") for n, t in gm.named_buffers(remove_duplicate=False)]
    for name, t, cat in named:
        if id(t) not in seen:
            seen.add(id(t))
            if cat == "parameters" and t.requires_grad:
                param_fakes.append(fakes[name])
                param_real.append(t)
            tracker.register(fakes[name], cat)
    # Constant tensors held as plain attributes (export lifts them to get_attr too).
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target not in fakes:
            obj = fetch_attr(gm, n.target)
            if isinstance(obj, torch.Tensor):
                f = fm.from_tensor(obj, static_shapes=True)
                tracker.register(f, "buffers")
                fakes[n.target] = f

    emu, opt_params = None, param_fakes
    if cap.data_parallel == "fsdp":
        # one rank under FSDP2: what it holds, beside the full parameters the graph computes with
        from memfit.cost_models.data_parallel import emulate

        names = {id(t): n for n, t, cat in named if cat == "parameters"}
        emu, opt_params = emulate(cap, tracker, fm, [(names[id(r)], f) for r, f in zip(param_real, param_fakes)],
                                  optimizer)

    flat = cap.flat_inputs()
    fake_inputs, symbols, sym_exprs = _fake_inputs(fm, flat, symbolic, DimDynamic, StatelessSymbolicContext)
    for f in fake_inputs:
        if isinstance(f, torch.Tensor):
            tracker.register(f, "inputs")
    if isinstance(loss_fn, LossWithTargets):
        fake_targets = loss_fn.fakes(fm, fake_inputs, symbols)
        for f in fake_targets:
            if isinstance(f, torch.Tensor):
                tracker.register(f, "inputs")
        loss_fn = functools.partial(_call_loss, loss_fn.fn, fake_targets)

    # Optimizer state exists before a steady-state step: build it with one step on zero grads.
    opt = None
    fused = isinstance(optimizer, StepInBackward)   # the step runs inside backward, per parameter
    if optimizer is not None:
        opt = make_optimizer(optimizer.as_plain() if fused else optimizer, opt_params,
                             param_real,   # the gm's are the model's Parameter objects, in the fakes' order
                             convert=lambda t: fm.from_tensor(t, static_shapes=True))
        with fm:
            for p in opt_params:
                p.grad = torch.zeros_like(p)
            opt.step()
            for p in opt_params:
                p.grad = None
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    tracker.register(v, "optimizer_state")
    if cap.data_parallel == "ddp":
        from memfit.cost_models.data_parallel import ddp_buckets

        buckets = ddp_buckets(tracker, fm, param_fakes)  # noqa: F841 - held to the end of the step
    grad_stores: list = []
    if fused:
        # the same hooks as at run time, on the fakes (armed); the gradients they free are
        # recorded first (their _Store records, not the storages, which must be free to die)
        for p in param_fakes:
            p.register_post_accumulate_grad_hook(lambda q: grad_stores.append(tracker.by_storage.get(q.grad.untyped_storage())))
        in_backward = StepInBackward(opt)
        in_backward.arm(simulated=True)
    start_events = len(tracker.events)

    def pack(t):
        s = tracker.register(t)
        if s is not None and s.category is None:
            s.saved = True
        if on_save is not None and tracker.node is not None:
            on_save(tracker.node, t, s is not None and s.category in _PREEXISTING)
        return t

    node_out_bytes: dict[str, int] = {}

    class _Runner(torch.fx.Interpreter):
        def fetch_attr(self, target):
            return fakes[target] if target in fakes else fetch_attr(gm, target)

        def run_node(self, n):
            tracker.node = n.name if n.op not in ("placeholder", "output") else None
            tracker.fx_node = n
            if emu is not None:
                emu.before_node(n, self.env)
            try:
                out = super().run_node(n)
            except MemfitError as e:
                # memfit's own error names the node already; fx would append the graph's code
                self.extra_traceback = False
                raise e
            if tracker.node is not None:
                total = 0
                seen = set()
                for t in pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        s = tracker.by_storage.get(t.untyped_storage())
                        if s is not None and s.node == n.name and id(s) not in seen:
                            seen.add(id(s))
                            total += s.nbytes
                node_out_bytes[n.name] = total
            if emu is not None:
                emu.after_node(n, out, self.env)
            return out

    from torch.nn.utils.stateless import _reparametrize_module

    # Leaf modules of symbolic_trace graphs read their own attributes: swap fakes in.
    module_fakes = {k: v for k, v in fakes.items() if _is_module_attr(gm, k)}
    _sole_owner_counts()    # measured once per process, outside this step's modes
    with fm, tracker, _reparametrize_module(gm, module_fakes, strict=False), probes.recording() as probed:
        tracker.phase = "forward"
        if emu is not None:
            emu.begin_forward()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            flat_out = _Runner(gm).run(*fake_inputs)
            tracker.node = tracker.fx_node = None
            if emu is not None:
                emu.end_forward()
            if forward_only:
                return None
            tracker.phase = "loss"
            loss = loss_fn(cap.unflatten_output(flat_out))
        del flat_out
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        tracker.phase = "backward"
        if loss.requires_grad:
            watched = tracker.watch_backward(loss)
            loss.backward()
            for h in watched:
                h.remove()
            tracker.engine_window = False
            if emu is not None:
                emu.end_backward()
        else:
            tracker.notes = getattr(tracker, "notes", []) + ["the loss does not require grad: no backward simulated"]
        del loss
        if opt is not None and not fused:
            tracker.phase = "optimizer"
            opt.step()

    grads = set()
    stores = [tracker.by_storage.get(p.grad.untyped_storage()) for p in opt_params if p.grad is not None]
    for s in stores + grad_stores:
        if s is not None:
            grads.add(id(s))
    opt_state = set()
    if opt is not None:
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    s = tracker.by_storage.get(v.untyped_storage())
                    if s is not None:
                        opt_state.add(id(s))
    for s in tracker.stores:
        if s.category is not None:
            continue
        if id(s) in grads:
            s.category = "gradients"
        elif id(s) in opt_state:
            s.category = "optimizer_state"
        elif s.saved:
            s.category = "saved_activations"
        else:
            s.category = "transient"

    settled = _settle_symbols(symbols, sym_exprs, fm.shape_env, tracker.specialized)
    analysis = _build_analysis(gm, tracker, start_events, node_out_bytes, symbols, sym_exprs,
                               fm.shape_env, device_spec or DeviceSpec.for_device(_device_of(flat, gm)),
                               node_times)
    analysis.notes[:0] = settled
    if probed.note():
        analysis.notes.append(probed.note())
    if tracker.device is not None and tracker.device.type == "cuda":
        from memfit.cost_models.cuda_allocator import predict
        analysis.allocator, note = predict(tracker.events, start_events)
        analysis.notes.append(note)
    # Keep the fake objects alive until here so no free events are appended late.
    del fakes, param_fakes, opt, opt_params, emu
    return analysis


def _is_module_attr(gm, target: str) -> bool:
    try:
        obj = fetch_attr(gm, target)
    except AttributeError:
        return False
    return isinstance(obj, torch.Tensor)


def _device_of(flat, gm) -> torch.device:
    for t in list(flat) + list(gm.parameters()):
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _call_loss(fn, targets, output):
    return fn(output, *targets)


def _build_analysis(gm, tracker: _Tracker, start_events: int, node_out_bytes, symbols, sym_exprs,
                    shape_env, spec: DeviceSpec, node_times: dict | None = None) -> StepAnalysis:
    live = {c: 0 for c in CATEGORIES}
    simplify_cache: dict[Any, Any] = {}

    def simp(e):
        r = simplify_cache.get(e)
        if r is None:
            r = shape_env.simplify(e) if not isinstance(e, sympy.Integer) else e
            r = _rename(r, sym_exprs, shape_env)
            simplify_cache[e] = r
        return r

    # Per-store line in B (T fixed at its example value) for "largest batch that fits".
    bsym = sympy.Symbol("B")
    line_cache: dict[Any, tuple[int, int] | None] = {}
    nonlinear = False
    made_up = [False]

    def line(s: _Store) -> tuple[int, int]:
        nonlocal nonlinear
        e = simp(s.expr)
        r = line_cache.get(e)
        if r is None:
            fixed = e.subs({sympy.Symbol(k): v for k, v in symbols.items() if k != "B"})
            if fixed.free_symbols - {bsym}:
                # a size the step made up (data-dependent): its example value, and no batch line
                fixed = fixed.subs({v: shape_env.var_to_val.get(v, 0) for v in fixed.free_symbols - {bsym}})
                nonlinear = made_up[0] = True
            a = fixed.subs(bsym, 0)
            b = fixed.subs(bsym, 1) - a
            if fixed.subs(bsym, 7) != a + 7 * b or fixed.subs(bsym, 64) != a + 64 * b:
                nonlinear = True
            r = (int(a), int(b))
            line_cache[e] = r
        return r

    has_b = "B" in symbols
    A = S = 0
    peak = -1
    peak_idx = 0
    peak_breakdown: dict[str, int] = {}
    peak_phase = "start"
    peak_node = None
    timeline = []
    batch_line = []
    for i, (sign, s, ev_phase) in enumerate(tracker.events):
        live[s.category] += sign * s.nbytes
        if has_b:
            a, b = line(s)
            A += sign * a
            S += sign * b
        if i + 1 < start_events:
            continue
        total = sum(live.values())
        phase = ev_phase
        timeline.append((i, phase, dict(live)))
        if has_b:
            batch_line.append((A, S))
        if total > peak:
            peak, peak_idx = total, i
            peak_breakdown = dict(live)
            peak_phase = phase
            peak_node = s.node

    # Expression of the peak: sum of the storages live at the peak event.
    alive = set()
    for sign, s, _ in tracker.events[:peak_idx + 1]:
        if sign > 0:
            alive.add(id(s))
        else:
            alive.discard(id(s))
    peak_expr = sympy.Integer(0)
    saved_expr = sympy.Integer(0)
    by_id = {id(s): s for s in tracker.stores}
    exprs_by_id = {}
    for sid in alive:
        exprs_by_id[sid] = simp(by_id[sid].expr)
    peak_expr = sympy.Add(*exprs_by_id.values()) if exprs_by_id else sympy.Integer(0)

    # Totals: the step's bytes per category (saved: all saved during the forward; others:
    # the largest live value over the step).
    totals = {c: 0 for c in CATEGORIES}
    for _, _, lv in timeline:
        for c, v in lv.items():
            totals[c] = max(totals[c], v)
    saved_total = 0
    nodes: dict[str, NodeCost] = {}
    saved_by_node: dict[str, int] = {}
    saved_expr_by_node: dict[str, Any] = {}
    for s in tracker.stores:
        if s.category == "saved_activations":
            saved_total += s.nbytes
            key = s.node or "<loss>"
            saved_by_node[key] = saved_by_node.get(key, 0) + s.nbytes
            e = simp(s.expr)
            saved_expr_by_node[key] = saved_expr_by_node.get(key, 0) + e
    saved_expr = sympy.Add(*saved_expr_by_node.values()) if saved_expr_by_node else sympy.Integer(0)
    totals["saved_activations"] = saved_total

    from memfit.cost_models.roofline import node_seconds

    total_flops = 0
    seconds = node_seconds(gm, tracker.node_flops, node_out_bytes, spec, node_times, _val_bytes)
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        fl = tracker.node_flops.get(n.name, 0)
        total_flops += fl
        rec = NodeCost(name=n.name, module=module_path(n), output_bytes=node_out_bytes.get(n.name, 0),
                       saved_bytes=saved_by_node.get(n.name, 0), flops=fl, est_time_s=seconds[n.name],
                       saved_expr=sympy.simplify(saved_expr_by_node.get(n.name, 0)),
                       kept_bytes=tracker.node_kept.get(n.name, 0))
        n.meta["memfit"] = rec
        nodes[n.name] = rec

    notes = list(getattr(tracker, "notes", []))
    if has_b and made_up[0]:
        notes.append("some allocation's size depends on tensor values (a data-dependent size), taken at "
                     "its example value; the largest-batch answer is not given")
    elif has_b and nonlinear:
        notes.append("some allocation grows faster than linearly in the batch size; "
                     "the largest-batch answer is not given")
    if symbols and any(sympy.Symbol(k) not in peak_expr.free_symbols for k in symbols):
        fixed = [k for k in symbols if sympy.Symbol(k) not in peak_expr.free_symbols]
        notes.append("peak does not depend on " + ", ".join(fixed))
    return StepAnalysis(nodes=nodes, totals=totals, peak_bytes=peak, peak_breakdown=peak_breakdown,
                        peak_phase=peak_phase, peak_node=peak_node, timeline=timeline,
                        symbols=symbols, peak_expr=sympy.expand(peak_expr),
                        saved_expr=sympy.expand(saved_expr), batch_line=batch_line,
                        batch_nonlinear=nonlinear, flops=total_flops, notes=notes)


def _val_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        try:
            _, h = _expr_and_hint(v.numel())
            return h * v.element_size()
        except Exception:  # noqa: BLE001
            return 0
    return 0
