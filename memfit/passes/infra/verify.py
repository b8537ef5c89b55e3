"""Verify mode of the PassManager (`PassManager(..., verify=True)`): after each pass it checks

1. every node computing a tensor still has shape metadata (`node.meta["val"]`), and its
   dtype and static sizes agree with the value the node computes on the example inputs;
2. the pass changed no parameter or buffer in place (the captured graph shares them with
   the user's model);
3. outputs, and gradients of the parameters and of the floating-point inputs, on the real
   example inputs (`ctx.example_inputs`) match those of the graph before the pass, within
   the pass's `promise`: "exact" compares `||a - b|| <= rtol * ||b||` per tensor (plus a floor
   of `rtol * 1e-3` times the largest gradient norm, so near-zero gradients do not fail on
   rounding; where that fails, the rounding noise of each tensor is measured by running the
   new graph again with inputs and parameters moved by one ulp, and ROUNDING_SLACK times it
   is allowed too: a gradient that cancels to ~0, such as a BatchNorm bias before another
   normalization, is noise as large as its own value in fp32), "approximate" needs cosine similarity at least `promise.cosine` (0.99 when
   unset), "changes_function" skips the numerics. Both runs start from the same RNG seed
   (`ctx.verify_seed`, default 0), so dropout draws the same masks.

The loss whose gradients are compared is a fixed random projection of every floating-point
output (`sum_i <out_i, w_i>`, w_i seeded), so every output element reaches the gradients.
Gradients come from `torch.autograd.grad`, and the parameters' `.grad`, the buffers
(BatchNorm running statistics) and the RNG state are restored after every run, so the user's
model is left as it was, also when verification fails. A failure raises VerificationError
(a PassError) naming the pass, the first mismatching output or gradient, the first node whose
value differs from the graph before the pass, and the passes that ran before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx

from memfit.errors import PassError
from memfit.passes.infra.base import Pass, PassContext, Promise


class VerificationError(PassError):
    """Verify mode found a pass that broke shape metadata, parameters or numerics."""


@dataclass
class _Run:
    outputs: list
    grads: dict[str, torch.Tensor | None]          # "param <name>" / "input <i>" -> grad
    values: dict[str, object] = field(default_factory=dict)  # node name -> detached value
    order: list[str] = field(default_factory=list)


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, object] = {}
        self.order: list[str] = []

    def run_node(self, n):
        out = super().run_node(n)
        if n.op != "output":
            self.values[n.name] = _detach(out)
            self.order.append(n.name)
        return out


def _detach(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_detach(x) for x in v) if isinstance(v, tuple) else [_detach(x) for x in v]
    return v


class _State:
    """Snapshot of what running a graph may change in the user's model: `.grad` of
    parameters, buffers (BatchNorm statistics), parameter values, and the RNG state.

    Buffers are compared and restored by value: kernels such as native batch norm update
    running statistics without bumping the tensor's version counter, and `.data` writes
    never bump it."""

    def __init__(self, gm: torch.nn.Module):
        self.params: dict[int, tuple] = {}
        self.buffers: dict[int, tuple] = {}
        self.rng = torch.get_rng_state()
        self.track(gm)

    def track(self, gm: torch.nn.Module) -> None:
        """Snapshot tensors not seen yet (a pass may add some to the graph module)."""
        for p in gm.parameters():
            if id(p) not in self.params:
                self.params[id(p)] = (p, p.detach().clone(), p.grad.clone() if p.grad is not None else None)
        for b in gm.buffers():
            if id(b) not in self.buffers:
                self.buffers[id(b)] = (b, b.detach().clone())

    def changed(self) -> list[torch.Tensor]:
        return [t for t, val, *_ in list(self.params.values()) + list(self.buffers.values())
                if not _same(t, val)]

    def restore(self, values: bool = False) -> None:
        with torch.no_grad():
            for p, val, grad in self.params.values():
                if values and not _same(p, val):
                    p.copy_(val)
                p.grad = None if grad is None else grad.clone()
            for b, val in self.buffers.values():
                if not _same(b, val):
                    b.copy_(val)
        torch.set_rng_state(self.rng)


def _same(t: torch.Tensor, val: torch.Tensor) -> bool:
    if t.shape != val.shape or t.dtype != val.dtype:
        return False
    if torch.equal(t.detach(), val):
        return True
    # NaN != NaN: compare the bytes (a pass must not hide NaN, nor be blamed for one)
    return t.is_floating_point() and torch.equal(t.detach().reshape(-1).view(torch.uint8), val.reshape(-1).view(torch.uint8))


class _Verifier:
    def __init__(self, gm: torch.fx.GraphModule, ctx: PassContext):
        if ctx.captured is None and ctx.inputs is None:
            raise PassError("verify mode needs example inputs: give the PassContext a `captured` "
                            "(memfit.capture(...)) or `inputs` (a list of flat inputs)")
        self.inputs = list(ctx.example_inputs)
        self.seed = int(ctx.verify_seed)
        self.state = _State(gm)
        self.missing_before = {n.name for n in _missing_meta(gm)}
        try:
            self.prev = self._execute(gm)
        except Exception as e:
            self.state.restore(values=True)
            raise PassError(f"verify mode: the graph does not run on the example inputs before any pass: "
                            f"{type(e).__name__}: {e}") from e

    def close(self) -> None:
        self.state.restore(values=True)

    def _execute(self, gm, jitter: bool = False) -> _Run:
        inputs = [x.detach().clone().requires_grad_(True)
                  if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in self.inputs]
        try:
            if jitter:
                gen = torch.Generator().manual_seed(self.seed + 2)
                with torch.no_grad():
                    for t in [x for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point()] + \
                             [p for p in gm.parameters() if p.is_floating_point()]:
                        t.add_(_ulp_step(t, gen))
            torch.manual_seed(self.seed)
            rec = _Recorder(gm)
            with torch.enable_grad():
                out = rec.run(*inputs)
                flat = list(out) if isinstance(out, (tuple, list)) else [out]
                named = [(f"param {n}", p) for n, p in gm.named_parameters() if p.requires_grad]
                named += [(f"input {i}", x) for i, x in enumerate(inputs)
                          if isinstance(x, torch.Tensor) and x.requires_grad]
                loss = _projection_loss(flat, self.seed)
                grads: dict[str, torch.Tensor | None] = {}
                if loss is not None and loss.requires_grad and named:
                    gs = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True)
                    grads = {k: (g.detach() if g is not None else None) for (k, _), g in zip(named, gs)}
            return _Run([_detach(o) for o in flat], grads, rec.values, rec.order)
        finally:
            self.state.restore(values=jitter)

    def check(self, p: Pass, gm: torch.fx.GraphModule, before: str) -> None:
        where = f"verification failed after pass {p.to_text()!r} (passes run before: {before})"

        def fail(msg):
            self.state.restore(values=True)
            raise VerificationError(f"{where}: {msg}")

        changed = self.state.changed()
        if changed:
            names = {id(t): n for n, t in list(gm.named_parameters()) + list(gm.named_buffers())}
            which = ", ".join(names.get(id(t), "<unnamed>") for t in changed[:3])
            fail(f"the pass changed {which} in place; parameters and buffers are shared with the user's "
                 "model and must not be modified (restored)")
        self.state.track(gm)
        try:
            cur = self._execute(gm)
        except Exception as e:
            fail(f"the rewritten graph fails on the example inputs: {type(e).__name__}: {e}")
        # Nodes computing tensors need shape metadata; get_attr of a module or a node
        # returning a context object has none to give.
        missing = [n for n in _missing_meta(gm) if n.name not in self.missing_before
                   and _has_tensor(cur.values.get(n.name))]
        if missing:
            fail(f"node {missing[0].format_node()} has no shape metadata (node.meta['val']); "
                 "a pass that creates nodes must fill it")
        for n in gm.graph.nodes:
            if n.op != "output" and n.name in cur.values:
                bad = _meta_disagrees(n.meta.get("val"), cur.values[n.name])
                if bad:
                    fail(f"node {n.format_node()}: metadata says {bad[0]} but it computes {bad[1]}")
        if p.promise.kind != "changes_function":
            msg = _compare_runs(self.prev, cur, p.promise)
            if msg and p.promise.kind == "exact":
                # Near-cancelling gradients (a BatchNorm bias before another normalization) are
                # rounding noise in fp32, as large as their value: measure that noise on this
                # graph (inputs and parameters moved by one ulp) and allow a few times it.
                msg = _compare_runs(self.prev, cur, p.promise, noise=_noise(cur, self._execute(gm, jitter=True)))
            if msg:
                node = _first_differing_node(self.prev, cur, p.promise, gm)
                fail(msg + (f"; first node that differs from the graph before the pass: {node}" if node else ""))
        self.prev = cur


def _has_tensor(v) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)):
        return any(_has_tensor(x) for x in v)
    return False


def _missing_meta(gm) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op != "output" and "val" not in n.meta]


def _meta_disagrees(meta, real):
    """(what meta says, what the node computes) if dtype or a static size disagrees."""
    if isinstance(meta, torch.Tensor) and isinstance(real, torch.Tensor):
        if meta.dtype != real.dtype:
            return str(meta.dtype), str(real.dtype)
        if meta.dim() != real.dim():
            return f"shape {list(meta.shape)}", f"shape {list(real.shape)}"
        for a, b in zip(meta.shape, real.shape):
            if isinstance(a, int) and a != b:
                return f"shape {list(meta.shape)}", f"shape {list(real.shape)}"
    elif isinstance(meta, (tuple, list)) and isinstance(real, (tuple, list)) and len(meta) == len(real):
        for m, r in zip(meta, real):
            bad = _meta_disagrees(m, r)
            if bad:
                return bad
    return None


def _projection_loss(outputs, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    loss = None
    for o in outputs:
        if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad:
            w = torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device, o.dtype)
            term = (o * w).sum()
            loss = term if loss is None else loss + term
    return loss


def _mismatch(a, b, promise: Promise, floor: float = 0.0, noise: float = 0.0) -> str | None:
    """Why tensor `a` (after) does not match `b` (before) under `promise`, or None. `noise`:
    the measured rounding noise of this tensor (see _noise), of which ROUNDING_SLACK times is
    allowed on top of the tolerance."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"{type(a).__name__} where the graph before gave {type(b).__name__}"
        return None
    if a.shape != b.shape:
        return f"shape {list(a.shape)} where the graph before gave {list(b.shape)}"
    if not a.is_floating_point() or not b.is_floating_point():
        return None if torch.equal(a, b) else "integer values differ"
    a64, b64 = a.detach().double(), b.detach().double()
    nan_a, nan_b = a64.isnan(), b64.isnan()
    if not torch.equal(nan_a, nan_b):
        return "NaN positions differ"
    a64, b64 = a64.masked_fill(nan_a, 0), b64.masked_fill(nan_b, 0)
    if promise.kind == "approximate":
        target = promise.cosine if promise.cosine is not None else 0.99
        na, nb = a64.norm().item(), b64.norm().item()
        if na == 0 and nb == 0:
            return None
        cos = (a64 * b64).sum().item() / (na * nb) if na and nb else 0.0
        return None if cos >= target else f"cosine similarity {cos:.6f} < {target}"
    err, ref = (a64 - b64).norm().item(), b64.norm().item()
    if math.isfinite(err) and err <= promise.rtol * ref + floor + ROUNDING_SLACK * noise:
        return None
    rel = err / ref if ref else math.inf
    return f"relative error {rel:.3e} > rtol {promise.rtol:g}" + (
        f" (its rounding noise, measured with inputs and parameters moved by one ulp, is "
        f"{noise / ref if ref else math.inf:.1e} relative)" if noise else "")


# How many times a tensor's measured rounding noise an exact pass may differ by.
ROUNDING_SLACK = 8.0


def _ulp_step(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A move of each element by one unit in the last place of its dtype, of random sign."""
    sign = torch.randint(0, 2, t.shape, generator=gen).to(t.device, t.dtype) * 2 - 1
    return t.detach() * sign * torch.finfo(t.dtype).eps


def _noise(run: _Run, jittered: _Run) -> dict[str, float]:
    """Per output and gradient: how far the values moved when inputs and parameters moved by
    one ulp (_ulp_step), a measure of the rounding noise the computation carries. A gradient
    that cancels to ~0 (a normalization's bias before another normalization) moves by as much
    as its value; a well-conditioned one by ~1e-7 relative in fp32."""
    def dist(a, b):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.is_floating_point()):
            return 0.0
        d = (a.detach().double() - b.detach().double()).nan_to_num(0.0, 0.0, 0.0).norm().item()
        return d if math.isfinite(d) else 0.0
    out = {f"output {i}": dist(a, b) for i, (a, b) in enumerate(zip(run.outputs, jittered.outputs))}
    out.update({k: dist(g, jittered.grads.get(k)) for k, g in run.grads.items()})
    return out


def _compare_runs(before: _Run, after: _Run, promise: Promise, noise: dict | None = None) -> str | None:
    noise = noise or {}
    if len(before.outputs) != len(after.outputs):
        return f"the graph returns {len(after.outputs)} outputs, before the pass {len(before.outputs)}"
    for i, (a, b) in enumerate(zip(after.outputs, before.outputs)):
        why = _mismatch(a, b, promise, noise=noise.get(f"output {i}", 0.0))
        if why:
            return f"output {i} differs: {why}"
    added = sorted(set(after.grads) - set(before.grads))
    removed = sorted(set(before.grads) - set(after.grads))
    if added or removed:
        return f"the trainable tensors changed: added {added or 'none'}, removed {removed or 'none'}"
    norms = [g.double().norm().item() for g in before.grads.values() if g is not None]
    floor = promise.rtol * 1e-3 * max(norms, default=0.0)
    for k, b in before.grads.items():
        a = after.grads[k]
        if (a is None) != (b is None):
            return f"gradient of {k} is {'missing' if a is None else 'present'} after the pass " \
                   f"but {'present' if a is None else 'missing'} before"
        if a is None:
            continue
        why = _mismatch(a, b, promise, floor, noise.get(k, 0.0))
        if why:
            return f"gradient of {k} differs: {why}"
    return None


def _first_differing_node(before: _Run, after: _Run, promise: Promise, gm) -> str | None:
    """The first node (in the new graph's order) present in both runs whose value differs."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in after.order:
        if name not in before.values:
            continue
        a, b = after.values[name], before.values[name]
        pairs = list(zip(a, b)) if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) else [(a, b)]
        for x, y in pairs:
            if _mismatch(x, y, promise):
                n = nodes.get(name)
                return n.format_node() if n is not None else f"%{name}"
    return None
