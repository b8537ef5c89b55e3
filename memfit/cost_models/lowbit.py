"""What torchao's low-bit Adam (memfit.runtime.lowbit) holds and allocates, for the cost model.

torchao's states are tensor subclasses and its step is compiled code, neither of which runs on
FakeTensors. So the simulated step uses `LowBitStandIn`, an optimizer that allocates what the
real one does and nothing else:

- State: for each parameter, the bytes of the buffers torchao itself builds for it, built on
  the meta device (no memory) by the real optimizer's own `_new_buffer`: codes, block scales
  and code book for a quantized state, an fp32 tensor for a small one.
- Step scratch: torchao's compiled step materializes fp32 temporaries (the dequantized moments
  before they are quantized back), freed before the next parameter. How many depends on what
  the compiler fuses on this device, so it is measured, not assumed: a probe runs the real
  optimizer on real zero parameters at two sizes of each of its two paths (quantized and
  fp32 states), after a first step that compiles, and reads the allocator during the second;
  scratch = fixed + per_element * numel, the line through the two points. Cached with the
  kernel probes (memfit.cost_models.probe_store), keyed by class, block size, path, dtype,
  device, threads, torch and torchao versions. On this project's CPU figures (2-core Xeon,
  torch 2.13, torchao 0.18): 8.03 B per element for 8-bit states, 26.06 for 4-bit, 12 B flat
  for fp32 states. An optimizer memfit made steps large parameters in row chunks
  (memfit.runtime.lowbit.row_chunks): its scratch is the line at the largest chunk's size.
"""

from __future__ import annotations

import functools
import logging
import math

import torch

from memfit.cost_models.allocations import inner_tensors
from memfit.cost_models.probe_store import device_signature, lookup, memoize, write_cache, cache_path

log = logging.getLogger("memfit.cost_models.probes")

MIN_QUANTIZED = 4096          # torchao quantizes a state of at least this many elements ...
# ... whose count divides the block size (torchao.optim.adam._AdamBase._new_buffer); which path
# a parameter takes is read from the buffer torchao builds, these sizes only pick probe shapes.
_PROBE_SHAPES = {"quantized": ((16, 1024), (64, 1024)), "fp32": ((1000,), (3000,))}


class LowBitStandIn(torch.optim.Optimizer):
    """Allocates what `source` (a torchao low-bit Adam) would in a step over `params`: its
    states (created at the first step) and, per parameter, its step's scratch, freed at once."""

    memfit_per_parameter = True      # runtime.optim.StepInBackward may step it per parameter

    def __init__(self, params, *, source: torch.optim.Optimizer, scratch: dict[int, int] | None = None):
        super().__init__(params, dict(source.defaults))
        self.source = source
        self._scratch = scratch if scratch is not None else {}
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) not in self._scratch:
                    self._scratch[id(p)] = step_scratch_bytes(source, p)

    def memfit_like(self, groups) -> "LowBitStandIn":
        """The same over other groups of the same parameters (StepInBackward's per-parameter ones)."""
        return LowBitStandIn(groups, source=self.source, scratch=self._scratch)

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                        for part, nbytes in enumerate(state_parts(self.source, p, signed)):
                            st[f"{name}.{part}"] = torch.empty(nbytes, dtype=torch.uint8, device=p.device)
                n = self._scratch.get(id(p), 0)
                if n > 0:       # the step's scratch: allocated, then freed at once
                    torch.empty(n, dtype=torch.uint8, device=p.device)
        return None


def state_parts(source, p: torch.Tensor, signed: bool) -> tuple[int, ...]:
    """Bytes of each tensor torchao's `source` keeps for one moment of `p`."""
    return _meta_states(source, p)[signed][0]


def _settings(source) -> dict:
    from memfit.runtime.lowbit import settings
    return settings(source)


def _meta_states(source, p) -> dict:
    return _states_of(type(source), tuple(sorted(_settings(source).items())), tuple(p.shape), p.dtype)


@functools.lru_cache(maxsize=None)
def _states_of(cls, settings, shape, dtype) -> dict:
    """{signed: (bytes of each tensor of the state, bytes of its code book)}: the buffers torchao
    builds for a parameter of `shape`, built on the meta device."""
    with torch.device("meta"):
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype))
    out = {}
    for signed in (True, False):
        buf = _buffer(cls, dict(settings), p, signed)
        book = getattr(buf, "qmap", None)
        out[signed] = (tuple(int(t.nbytes) for t in inner_tensors(buf)),
                       int(book.nbytes) if isinstance(book, torch.Tensor) else 0)
    return out


def _buffer(cls, settings, p, signed):
    opt = cls([p], lr=1e-3)
    for k, v in settings.items():
        setattr(opt, k, v)
    return opt._new_buffer(p, signed)     # noqa: SLF001 - torchao's own rule for which states it quantizes


def _path(source, p) -> str:
    parts = state_parts(source, p, True)
    return "quantized" if len(parts) > 1 else "fp32"


# ----------------------------------------------------------------------------- the step probe

def step_scratch_bytes(source, p: torch.Tensor) -> int:
    """Scratch of one step of `source` on `p` (module doc): the probed line at the size of the
    largest piece stepped at once (p, or its largest row chunk when `source` steps in chunks:
    memfit.runtime.lowbit.row_chunks)."""
    from memfit.runtime.lowbit import row_chunks

    path = _path(source, p)
    entry = _probe_line(source, path, p.dtype, p.device)
    if entry is None:
        return 0
    n = math.prod(int(s) for s in p.shape)
    chunk = getattr(source, "memfit_chunk_elements", None)
    spans = row_chunks(tuple(int(s) for s in p.shape), _settings(source).get("block_size", 1),
                       path == "quantized", chunk) if chunk else None
    extra = 0
    if spans:
        n = max(e - s for s, e in spans) * (n // int(p.shape[0]))
        extra = sum(book for _, book in _meta_states(source, p).values())  # each chunk's slices clone it
    return max(0, int(round(entry["fixed"] + entry["per_element"] * n))) + extra


def probe_key(source, path: str, dtype: torch.dtype, device: torch.device) -> str:
    import torchao

    s = _settings(source)
    return (f"torchao.{type(source).__name__}.step|block={s.get('block_size')}|{path}|{dtype}|"
            f"{device_signature(device)}|threads={torch.get_num_threads()}|torch-{torch.__version__}|"
            f"torchao-{torchao.__version__}")


_SKIPPED: dict[str, str] = {}


def _probe_line(source, path: str, dtype: torch.dtype, device: torch.device) -> dict | None:
    key = probe_key(source, path, dtype, device)
    hit = lookup(key)
    if hit is not None:
        return hit
    if key in _SKIPPED:
        return None
    try:
        points = [(math.prod(shape), _measure(source, shape, dtype, device, path))
                  for shape in _PROBE_SHAPES[path]]
    except _Unavailable as e:
        _SKIPPED[key] = str(e)
        log.info("memfit: %s not probed (%s); its step scratch is taken as 0 bytes", key, e)
        return None
    (n1, b1), (n2, b2) = points
    per = (b2 - b1) / (n2 - n1)
    entry = {"fixed": b1 - per * n1, "per_element": per, "points": [list(x) for x in points]}
    memoize(key, entry)
    write_cache(cache_path(), {key: entry})
    log.info("memfit: probed %s: %.3f B per element + %d B", key, per, int(entry["fixed"]))
    return entry


def skipped() -> dict[str, str]:
    """Probes that could not run here (key -> why): their scratch was taken as 0 bytes."""
    return dict(_SKIPPED)


class _Unavailable(RuntimeError):
    pass


def _measure(source, shape, dtype, device, path: str | None = None) -> int:
    """Peak bytes allocated during a second real step of `source`'s class on a zero parameter
    of `shape` (which must take torchao's `path`, when given)."""
    from torch.utils._python_dispatch import _disable_current_modes

    from memfit.cost_models.allocations import cpu_allocations, profiler_peak
    from memfit.ir.capture import quiet_torch

    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Unavailable("planning for CUDA without a CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise _Unavailable(f"no probe for {device.type} tensors")
    if device.type == "cpu" and torch._C._autograd._profiler_enabled():  # noqa: SLF001
        raise _Unavailable("a torch.profiler session is already running (they do not nest)")
    with _disable_current_modes(), quiet_torch():
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
        took = _path(source, p)
        if path is not None and took != path:
            raise _Unavailable(f"a probe parameter of shape {tuple(shape)} takes torchao's {took} path, "
                               f"not the {path} one, with block size {_settings(source).get('block_size')}")
        opt = type(source)([p], lr=1e-3)
        for k, v in _settings(source).items():
            setattr(opt, k, v)
        p.grad = torch.zeros_like(p)
        opt.step()                               # compiles; creates the state
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            opt.step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            with cpu_allocations() as prof:
                opt.step()
            peak = profiler_peak(prof)
        del opt, p
    return max(0, int(peak))
