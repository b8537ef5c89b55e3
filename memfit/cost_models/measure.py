"""Truth: run one real training step and report the bytes it held, by category.

- Saved activations: exact, from `torch.autograd.graph.saved_tensors_hooks` (unique
  storages; storages of parameters, buffers and inputs excluded). Under non-reentrant
  checkpointing the hooks see only region inputs, which is why the peak comes from the
  allocator and not from the hooks.
- Step peak: on CUDA `torch.cuda.max_memory_allocated`; on CPU the allocator's own
  allocation events, read from `torch.profiler` with `profile_memory=True`, which also see
  scratch memory inside kernels and compiled code.

The step measured is a steady-state one: the optimizer's state is created first (one step
on zero gradients), gradients are set to None as `zero_grad()` does, then forward, loss,
backward and optimizer step run. Parameters, buffers, gradients, optimizer state and the
RNG state are restored afterwards, so the user's model is left as it was.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.utils._pytree as pytree

from memfit.cost_models.memory import default_loss, make_optimizer
from memfit.cost_models.allocations import cpu_allocations, inner_tensors, profiler_net, profiler_peak
from memfit.runtime.optim import StepInBackward


@dataclass
class Measurement:
    """Measured bytes of one training step."""

    device: str
    parameters: int
    buffers: int
    inputs: int
    optimizer_state: int
    gradients: int
    saved_activations: int
    peak_bytes: int
    baseline_bytes: int          # live at the start of the step
    method: str                  # how the peak was read
    step_time_s: float
    notes: list[str] = field(default_factory=list)
    # CUDA: torch.cuda.max_memory_reserved over the step, the caching allocator's segments,
    # which depends on what the process allocated before (cached segments are kept)
    reserved_peak_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        from memfit.budget import format_bytes as fb
        return (f"measured on {self.device} ({self.method}): peak {fb(self.peak_bytes)}; "
                f"parameters {fb(self.parameters)}, gradients {fb(self.gradients)}, "
                f"optimizer state {fb(self.optimizer_state)}, saved activations "
                f"{fb(self.saved_activations)}, step {self.step_time_s * 1e3:.1f} ms")


def _storages_bytes(tensors) -> tuple[int, set]:
    seen = set()
    total = 0
    for t in [x for t in tensors if isinstance(t, torch.Tensor) for x in inner_tensors(t)]:
        st = t.untyped_storage()
        key = (st.device.type, st.data_ptr())
        if key in seen or st.nbytes() == 0:
            continue
        seen.add(key)
        total += st.nbytes()
    return total, seen


def measure(model: torch.nn.Module, *, example_inputs=(), example_kwargs=None, example_targets=(),
            optimizer=None, loss_fn: Callable | None = None, data_parallel: str | None = None) -> Measurement:
    """Run one real training step of `model` and measure its memory (see module doc).
    The loss is `loss_fn(output, *example_targets)` (memfit.plan's rules).
    `data_parallel="ddp"`: the step runs through DistributedDataParallel(model), built just
    before it; what its construction keeps allocated (the gradient buckets) counts in the
    baseline (a process group must be initialized; every rank calls measure)."""
    import time

    from memfit.cost_models.optimizers import bind_targets

    loss_fn = bind_targets(loss_fn, example_targets)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})
    loss_fn = loss_fn or default_loss
    params = [p for p in model.parameters() if p.requires_grad]
    device = next((t.device for t in pytree.tree_leaves((example_inputs, example_kwargs))
                   if isinstance(t, torch.Tensor)), params[0].device if params else torch.device("cpu"))

    with _restored(model, optimizer):
        opt = optimizer if isinstance(optimizer, torch.optim.Optimizer) else make_optimizer(optimizer, params)
        if isinstance(opt, StepInBackward):
            opt.warm_up()
        elif opt is not None and not any(opt.state.values()):
            for p in params:
                p.grad = torch.zeros_like(p)
            opt.step()
        for p in model.parameters():
            p.grad = None
        opt_tensors = [v for st in (opt.state.values() if opt else []) for v in st.values()
                       if isinstance(v, torch.Tensor)]
        p_bytes, p_keys = _storages_bytes(model.parameters())
        b_bytes, b_keys = _storages_bytes(model.buffers())
        given = pytree.tree_leaves((example_inputs, example_kwargs, getattr(loss_fn, "targets", ())))
        in_bytes, in_keys = _storages_bytes(given)
        o_bytes, o_keys = _storages_bytes(opt_tensors)
        excluded = p_keys | b_keys | in_keys | o_keys
        baseline = _storages_bytes(list(model.parameters()) + list(model.buffers()) + given + opt_tensors)[0]
        saved: dict = {}

        def pack(t):
            st = t.untyped_storage()
            key = (st.device.type, st.data_ptr())
            if key not in excluded and st.nbytes() > 0:
                saved[key] = st.nbytes()
            return t

        net = model
        if data_parallel == "ddp":
            # built before the step, as a training loop builds it; what it keeps (its gradient
            # buckets) joins the baseline; its construction's broadcast of the parameters from
            # rank 0 is not part of the step and is skipped (_ddp_with_kept_bytes)
            net, kept = _ddp_with_kept_bytes(model, device)
            baseline += kept
        elif data_parallel is not None:
            raise ValueError(f"data_parallel={data_parallel!r}: choose None or 'ddp'")

        def step():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = loss_fn(net(*example_inputs, **example_kwargs))
            loss.backward()
            del loss
            if opt is not None:
                opt.step()

        notes = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) - start + baseline
            reserved = torch.cuda.max_memory_reserved(device)
            method = "torch.cuda.max_memory_allocated"
            if start != baseline:
                notes.append(f"{start - baseline} bytes were allocated on the device before the "
                             "step besides the model, inputs and optimizer state; not counted")
        else:
            reserved = None
            t0 = time.perf_counter()
            with cpu_allocations() as prof:
                step()
            dt = time.perf_counter() - t0
            peak = baseline + profiler_peak(prof)
            method = "torch.profiler allocator events"
            notes.append("step time includes profiler overhead")
        grad_bytes = _storages_bytes([p.grad for p in params if p.grad is not None])[0]
        return Measurement(device=str(device), parameters=p_bytes, buffers=b_bytes, inputs=in_bytes,
                           optimizer_state=o_bytes, gradients=grad_bytes,
                           saved_activations=sum(saved.values()), peak_bytes=int(peak),
                           baseline_bytes=baseline, method=method, step_time_s=dt, notes=notes,
                           reserved_peak_bytes=reserved)


def _ddp_with_kept_bytes(model, device) -> tuple[torch.nn.Module, int]:
    """DistributedDataParallel(model) and the bytes its construction left allocated.

    It is built without its initial broadcast of the parameters (init_sync=False), which is not
    part of the step and which measure would misread on CPU: the broadcast's flat copy of every
    parameter is held by gloo's work object, and the thread that drops that object last frees
    it. When that is gloo's worker thread, which the profiler does not follow, the free goes
    unseen and the copy counted as kept (30 constructions on each of 2 ranks: 5 of 60 counted
    it, 0 of 60 without the broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        net = DistributedDataParallel(model, init_sync=False)
        torch.cuda.synchronize(device)
        return net, torch.cuda.memory_allocated(device) - before
    with cpu_allocations() as prof:
        net = DistributedDataParallel(model, init_sync=False)
    return net, profiler_net(prof)


@contextlib.contextmanager
def _restored(model: torch.nn.Module, optimizer):
    """Put parameters, buffers, gradients, optimizer state and RNG back as they were."""
    with torch.no_grad():
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict(keep_vars=True).items()
                 if isinstance(v, torch.Tensor)}
    grads = {id(p): (p.grad.detach().clone() if p.grad is not None else None) for p in model.parameters()}
    opt_state = copy.deepcopy(optimizer.state_dict()) if isinstance(optimizer, torch.optim.Optimizer) else None
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            live = model.state_dict(keep_vars=True)
            for k, v in state.items():
                live[k].copy_(v)
        for p in model.parameters():
            p.grad = grads.get(id(p))
        if opt_state is not None:
            optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
