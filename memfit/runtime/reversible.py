"""Reversible two-stream couplings run without storing per-block activations.

One coupling (Gomez et al. 2017, "The Reversible Residual Network"; Mangalam et al. 2022,
"Reversible Vision Transformers"; with the scaling factors of Liao et al. 2023, "Make
Pre-trained Model Reversible", MEFT):

    y1 = lam * x1 + F(x2)            x2 = (y2 - G(y1)) / beta
    y2 = beta * x2 + G(y1)           x1 = (y1 - F(x2)) / lam

A stack of couplings runs in one `torch.autograd.Function`: forward under no_grad keeps only
the stack's final two streams (plus optional anchors), backward walks the couplings in reverse,
rebuilds each coupling's inputs from its outputs, recomputes F and G under enable_grad from
the rebuilt inputs and back-propagates through them (Gomez et al., Algorithm 1). Saved
activation bytes are therefore two streams per stack, whatever its depth.

`swap=True` exchanges the streams after each coupling, (x1, x2) <- (y2, y1): the MEFT order,
in which F always reads the stream that carries the pretrained hidden state.

Dropout inside F or G: the RNG state before each call is saved (5,056 bytes per call on CPU,
kept on `ctx`, not through autograd) and replayed on recomputation, so masks match.

Reconstruction is exact only in exact arithmetic. Rounding in y = lam*x + F(.) is amplified by
1/lam, 1/beta and the Lipschitz constants of F and G on the way down the stack; in fp16/bf16 or
with small lam it can grow large. `check=True` keeps every coupling's input to measure the
error per block; `anchor_every=k` keeps every k-th coupling's input, restarts reconstruction
there (bounding the drift to k couplings) and measures the error at each anchor for free.
Errors past `warn_threshold` raise a ReconstructionWarning naming the block.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

# Bytes of torch.get_rng_state() on CPU (mt19937 state); stated for the memory accounting.
CPU_RNG_STATE_BYTES = 5056


class ReconstructionWarning(UserWarning):
    """A reversible block's inputs were rebuilt with a relative error past the threshold."""


@dataclass
class Coupling:
    """One reversible coupling.

    F, G: `fn(x, *ext) -> tensor shaped like x`, or None for the zero function. `ext` lists
    the indices (into the stack's `ext` arguments) that F and G receive after x: shared
    tensors such as attention masks, or values computed upstream. `params`: leaf tensors
    F and G read directly (module parameters); their gradients are accumulated.
    lam, beta: the scaling factors of x1 and x2 (both 1 in RevNet/RevViT; nonzero).
    """

    F: Callable | None
    G: Callable | None
    name: str = ""
    lam: float = 1.0
    beta: float = 1.0
    params: tuple = ()
    ext: tuple = ()

    def __post_init__(self):
        if self.lam == 0 or self.beta == 0:
            raise ValueError(f"coupling {self.name!r}: lam and beta must be nonzero (they are "
                             "divided by when inputs are rebuilt)")


@dataclass
class ReconstructionReport:
    """What the last backward measured: relative reconstruction error per block name
    (only blocks whose input was stored: check mode or anchors), and counts."""

    errors: dict = field(default_factory=dict)
    reconstructed: int = 0
    anchored: int = 0

    def worst(self) -> tuple[str, float] | None:
        if not self.errors:
            return None
        k = max(self.errors, key=self.errors.get)
        return k, self.errors[k]


@dataclass
class StackOptions:
    swap: bool = False
    anchor_every: int = 0
    check: bool = False
    preserve_rng: bool = True
    warn_threshold: float = 1e-3

    def __post_init__(self):
        if self.anchor_every < 0:
            raise ValueError(f"anchor_every must be >= 0, got {self.anchor_every}")
        if not self.warn_threshold > 0:
            raise ValueError(f"warn_threshold must be > 0, got {self.warn_threshold}")


def _rel_err(rec: tuple, ref: tuple) -> float:
    """Reconstruction error of one coupling's input: max over both streams of max|rec - ref|,
    divided by the largest magnitude of the two reference streams (one stream may be all
    zeros, as MEFT's aux stream at the first block). fp32; 0 for FakeTensors (cost model)."""
    from torch._subclasses.fake_tensor import FakeTensor

    if any(isinstance(t, FakeTensor) for t in (*rec, *ref)):
        return 0.0
    num = max((a.detach().float() - r.detach().float()).abs().max().item() if r.numel() else 0.0
              for a, r in zip(rec, ref))
    den = max(r.detach().float().abs().max().item() if r.numel() else 0.0 for r in ref)
    if not math.isfinite(num):
        return float("inf")
    return num / max(den, 1e-30)


class _RNG:
    """Save and replay the global RNG state around one call of F or G."""

    @staticmethod
    def save(device: torch.device):
        cpu = torch.get_rng_state()
        dev = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cpu, dev

    @staticmethod
    @contextlib.contextmanager
    def replay(state, device: torch.device):
        if state is None:
            yield
            return
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=True):
            torch.set_rng_state(state[0])
            if state[1] is not None:
                torch.cuda.set_rng_state(state[1], device)
            yield


def _call(fn, x, ext):
    return fn(x, *ext)


def _forward_states(x1, x2, couplings, ext, opts, *, rng_states=None, keep=None):
    """Run the couplings; returns the final (x1, x2). `keep(j, x1, x2)` sees each input."""
    dev = x2.device
    for j, c in enumerate(couplings):
        if keep is not None:
            keep(j, x1, x2)
        e = [ext[i] for i in c.ext]
        if c.F is not None:
            if rng_states is not None:
                rng_states.append(_RNG.save(dev))
            y1 = x1 * c.lam + _call(c.F, x2, e) if c.lam != 1 else x1 + _call(c.F, x2, e)
        else:
            if rng_states is not None:
                rng_states.append(None)
            y1 = x1 * c.lam
        if c.G is not None:
            if rng_states is not None:
                rng_states.append(_RNG.save(dev))
            y2 = x2 * c.beta + _call(c.G, y1, e) if c.beta != 1 else x2 + _call(c.G, y1, e)
        else:
            if rng_states is not None:
                rng_states.append(None)
            y2 = x2 * c.beta
        x1, x2 = (y2, y1) if opts.swap else (y1, y2)
    return x1, x2


class _ReversibleStack(torch.autograd.Function):
    """inputs: (meta, x1, x2, *ext, *params); outputs: the final (x1, x2)."""

    @staticmethod
    def forward(ctx, meta, x1, x2, *rest):
        couplings, opts, n_ext = meta["couplings"], meta["opts"], meta["n_ext"]
        ext = rest[:n_ext]
        anchors: dict[int, tuple] = {}
        k = opts.anchor_every

        def keep(j, a, b):
            if opts.check or (k and j % k == 0):
                anchors[j] = (a, b)

        rng = [] if opts.preserve_rng else None
        y1, y2 = _forward_states(x1, x2, couplings, ext, opts, rng_states=rng, keep=keep)
        # y1 and y2 may alias x1/x2 when a coupling is the identity; clone keeps the outputs
        # distinct tensors, as autograd.Function requires of outputs it did not create.
        if y1 is x1 or y1 is x2:
            y1 = y1.clone()
        if y2 is x1 or y2 is x2 or y2 is y1:
            y2 = y2.clone()
        ext_t = [i for i, e in enumerate(ext) if isinstance(e, torch.Tensor)]
        anchor_ids = sorted(anchors)
        flat_anchors = [t for j in anchor_ids for t in anchors[j]]
        ctx.save_for_backward(y1, y2, *flat_anchors, *[ext[i] for i in ext_t])
        ctx.anchor_ids = anchor_ids
        ctx.ext_t = ext_t
        ctx.ext_other = {i: e for i, e in enumerate(ext) if not isinstance(e, torch.Tensor)}
        ctx.meta = meta
        ctx.rng = rng
        return y1, y2

    @staticmethod
    @torch.autograd.function.once_differentiable  # gradients of gradients would need create_graph
    def backward(ctx, dy1, dy2):
        meta = ctx.meta
        couplings, opts, n_ext = meta["couplings"], meta["opts"], meta["n_ext"]
        params: list = meta["params"]
        saved = ctx.saved_tensors
        y1_fin, y2_fin = saved[0], saved[1]
        na = 2 * len(ctx.anchor_ids)
        flat_anchors = saved[2:2 + na]
        anchors = {j: (flat_anchors[2 * i], flat_anchors[2 * i + 1]) for i, j in enumerate(ctx.anchor_ids)}
        ext_vals = list(saved[2 + na:])
        ext: list = [None] * n_ext
        for i, e in zip(ctx.ext_t, ext_vals):
            ext[i] = e.detach().requires_grad_(e.requires_grad and (e.is_floating_point() or e.is_complex()))
        for i, e in ctx.ext_other.items():
            ext[i] = e
        ext_grads: list = [None] * n_ext
        param_index = {id(p): i for i, p in enumerate(params)}
        param_grads: list = [None] * len(params)
        report: ReconstructionReport = meta["report"]
        report.errors.clear()
        report.reconstructed = report.anchored = 0
        dev = y2_fin.device

        x1, x2 = y1_fin.detach(), y2_fin.detach()
        dx1, dx2 = dy1, dy2
        rng = ctx.rng
        for j in range(len(couplings) - 1, -1, -1):
            c = couplings[j]
            y1, y2 = (x2, x1) if opts.swap else (x1, x2)
            gy1, gy2 = (dx2, dx1) if opts.swap else (dx1, dx2)
            e = [ext[i] for i in c.ext]
            e_req = [(i, ext[i]) for i in c.ext if isinstance(ext[i], torch.Tensor) and ext[i].requires_grad]
            p_req = [p for p in c.params if isinstance(p, torch.Tensor) and p.requires_grad]
            anchor = anchors.get(j)
            # G: rebuild x2 and back-propagate dy2 into y1, ext and G's parameters.
            if c.G is not None:
                y1_ = y1.detach().requires_grad_(True)
                with torch.enable_grad(), _RNG.replay(rng[2 * j + 1] if rng else None, dev):
                    g = _call(c.G, y1_, e)
                x2_rec = (y2 - g.detach()) / c.beta if c.beta != 1 else y2 - g.detach()
                ins = [y1_] + [t for _, t in e_req] + p_req
                grads = torch.autograd.grad(g, ins, gy2, allow_unused=True)
                del g
                d_y1 = gy1 + grads[0] if grads[0] is not None else gy1
                _accumulate(ext_grads, [i for i, _ in e_req], grads[1:1 + len(e_req)])
                _accumulate(param_grads, [param_index[id(p)] for p in p_req], grads[1 + len(e_req):])
            else:
                x2_rec = y2 / c.beta
                d_y1 = gy1
            x2_in = anchor[1] if anchor is not None else x2_rec
            # F: rebuild x1 and back-propagate dy1 (plus G's share) into x2, ext and F's parameters.
            d_x2 = gy2 * c.beta if c.beta != 1 else gy2
            if c.F is not None:
                x2_ = x2_in.detach().requires_grad_(True)
                with torch.enable_grad(), _RNG.replay(rng[2 * j] if rng else None, dev):
                    f = _call(c.F, x2_, e)
                x1_rec = (y1 - f.detach()) / c.lam if c.lam != 1 else y1 - f.detach()
                ins = [x2_] + [t for _, t in e_req] + p_req
                grads = torch.autograd.grad(f, ins, d_y1, allow_unused=True)
                del f
                if grads[0] is not None:
                    d_x2 = d_x2 + grads[0]
                _accumulate(ext_grads, [i for i, _ in e_req], grads[1:1 + len(e_req)])
                _accumulate(param_grads, [param_index[id(p)] for p in p_req], grads[1 + len(e_req):])
            else:
                x1_rec = y1 / c.lam
            d_x1 = d_y1 * c.lam if c.lam != 1 else d_y1
            if anchor is not None:
                name = c.name or f"coupling {j}"
                report.errors[name] = _rel_err((x1_rec, x2_rec), anchor)
                report.anchored += 1
                x1, x2 = anchor[0].detach(), anchor[1].detach()
            else:
                report.reconstructed += 1
                x1, x2 = x1_rec, x2_rec
            dx1, dx2 = d_x1, d_x2
        for name, err in report.errors.items():
            if err > opts.warn_threshold:
                warnings.warn(
                    f"reversible block {name}: its input was rebuilt with relative error {err:.3g} "
                    f"(threshold {opts.warn_threshold:g}); gradients of the blocks below it are "
                    "inexact. Use fp32 for the stack, a larger lam/beta, or anchor_every=k to store "
                    "every k-th block's input.", ReconstructionWarning, stacklevel=2)
        out_ext = []
        for i in range(n_ext):
            out_ext.append(ext_grads[i])
        return (None, dx1, dx2, *out_ext, *param_grads)


def _accumulate(store: list, idx: Sequence[int], grads) -> None:
    for i, g in zip(idx, grads):
        if g is None:
            continue
        store[i] = g if store[i] is None else store[i] + g


def reversible_stack(x1: torch.Tensor, x2: torch.Tensor, couplings: Sequence[Coupling], ext: Sequence = (),
                     *, swap: bool = False, anchor_every: int = 0, check: bool = False,
                     preserve_rng: bool = True, warn_threshold: float = 1e-3, recompute: bool = True,
                     report: ReconstructionReport | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `couplings` on the two streams (x1, x2) (each (B, ...), same shape and dtype).

    Returns the final streams. `recompute=False` runs the same couplings with ordinary
    autograd (every activation stored): the reference for gradient tests. `ext`: extra
    values F and G take (see Coupling.ext). `report`: filled by backward with the measured
    reconstruction errors (see ReconstructionReport).
    """
    couplings = list(couplings)
    if not couplings:
        raise ValueError("reversible_stack needs at least one coupling")
    if x1.shape != x2.shape:
        raise ValueError(f"the two streams must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
    opts = StackOptions(swap=swap, anchor_every=anchor_every, check=check, preserve_rng=preserve_rng,
                        warn_threshold=warn_threshold)
    ext = list(ext)
    if not recompute or not torch.is_grad_enabled():
        return _forward_states(x1, x2, couplings, ext, opts)
    params: list = []
    seen = set()
    for c in couplings:
        for p in c.params:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    meta = {"couplings": couplings, "opts": opts, "n_ext": len(ext), "params": params,
            "report": report if report is not None else ReconstructionReport()}
    return _ReversibleStack.apply(meta, x1, x2, *ext, *params)


# ----------------------------------------------------------------------------- the stack module

class _Residual:
    """r(x, *e) = block(x, *e) - x: the residual branch of a block h -> h + r(h)."""

    def __init__(self, fn, idx):
        self.fn, self.idx = fn, idx

    def __call__(self, x, *e):
        return self.fn(x, *[e[i] for i in self.idx]) - x


class _NegScaled:
    """G(y) = -beta * y: with it the MEFT aux stream holds beta * (a_i - a_{i+1}), the scaled
    residual update of block i, instead of beta * a_i (see docs/reversible.md, "delta")."""

    def __init__(self, beta):
        self.beta = beta

    def __call__(self, y, *e):
        return y * (-self.beta)


class _Whole:
    def __init__(self, fn, idx):
        self.fn, self.idx = fn, idx

    def __call__(self, x, *e):
        return self.fn(x, *[e[i] for i in self.idx])


class ReversibleStack(torch.nn.Module):
    """Runs converted blocks as reversible couplings: forward(h, *ext) -> h'.

    Owns no parameters: block children and the modules they call are held outside
    `_modules`, so state_dict keys stay the original model's. `report` holds the
    reconstruction errors measured by the last backward (check mode or anchors).
    """

    def __init__(self, children, ext_index, names, *, mode, lam, beta, anchor_every, check,
                 warn_threshold, preserve_rng, aux="copy"):
        super().__init__()
        self.aux = aux
        self.__dict__["blocks"] = list(children)
        self.mode, self.lam, self.beta = mode, lam, beta
        self.anchor_every, self.check, self.warn_threshold = anchor_every, check, warn_threshold
        self.preserve_rng = preserve_rng
        self.names = list(names)
        self.report = ReconstructionReport()
        self.recompute = True  # False: same couplings with stored activations (reference)
        self._couplings = self._build(list(children), ext_index)

    def _build(self, children, ext_index):
        def params(*cs):
            return tuple(p for c in cs for p in c.parameters())

        def union(*idx_lists):
            u = []
            for lst in idx_lists:
                for i in lst:
                    if i not in u:
                        u.append(i)
            return u

        out = []
        if self.mode == "meft":
            for c, idx, name in zip(children, ext_index, self.names):
                G = _NegScaled(self.beta) if self.aux == "delta" else None
                out.append(Coupling(F=_Whole(c, list(range(len(idx)))), G=G, name=name, lam=self.lam,
                                    beta=self.beta, params=params(c), ext=tuple(idx)))
            return out
        for j in range(0, len(children), 2):
            fi = children[j]
            if j + 1 < len(children):
                gi = children[j + 1]
                u = union(ext_index[j], ext_index[j + 1])
                F = _Residual(fi, [u.index(i) for i in ext_index[j]])
                G = _Residual(gi, [u.index(i) for i in ext_index[j + 1]])
                out.append(Coupling(F=F, G=G, name=f"{self.names[j]}+{self.names[j + 1]}", lam=self.lam,
                                    beta=self.beta, params=params(fi, gi), ext=tuple(u)))
            else:
                u = list(ext_index[j])
                out.append(Coupling(F=_Residual(fi, list(range(len(u)))), G=None, name=self.names[j],
                                    lam=self.lam, beta=self.beta, params=params(fi), ext=tuple(u)))
        return out

    def set_scaling(self, lam: float | None = None, beta: float | None = None) -> None:
        """Change lam and/or beta of every coupling (e.g. a MEFT schedule, or an ablation)."""
        for k, v in (("lam", lam), ("beta", beta)):
            if v is not None and v == 0:
                raise ValueError(f"{k} must be nonzero (the inverse divides by it)")
        self.lam = self.lam if lam is None else lam
        self.beta = self.beta if beta is None else beta
        for c in self._couplings:
            c.lam, c.beta = self.lam, self.beta
            if isinstance(c.G, _NegScaled):
                c.G.beta = self.beta

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, blocks={len(self.names)}, couplings={len(self._couplings)}, "
                f"lam={self.lam:g}, beta={self.beta:g}, anchor_every={self.anchor_every}"
                + (f", aux={self.aux}" if self.mode == "meft" else ""))

    def forward(self, h, *ext):
        if self.mode == "meft":
            x1, x2 = torch.zeros_like(h), h
        else:
            x1 = x2 = h
        y1, y2 = reversible_stack(x1, x2, self._couplings, ext, swap=self.mode == "meft",
                                  anchor_every=self.anchor_every, check=self.check,
                                  preserve_rng=self.preserve_rng, warn_threshold=self.warn_threshold,
                                  recompute=self.recompute, report=self.report)
        return y2 if self.mode == "meft" else (y1 + y2) * 0.5
