"""The CPU allocator's events, as the truth of what a step or a kernel allocates: a
torch.profiler session with `profile_memory=True` (it sees allocations inside kernels and
compiled code too), and the peak read from its events. Used by measure (one real step) and by
the kernel-scratch probes.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def cpu_allocations():
    """A torch.profiler session recording the CPU allocator's events (read them with
    profiler_peak). kineto writes a line to stderr when a session starts and when it stops;
    those two moments run with stderr pointed at /dev/null, so only memfit's own lines reach the
    user's terminal (the work inside the session keeps its stderr)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)


@contextlib.contextmanager
def _quiet_stderr():
    import os
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):   # no file descriptor 2 to point elsewhere
        yield
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiler_peak(prof) -> int:
    """Largest net bytes allocated on the CPU (above the start) among a profile's allocation events."""
    allocs = _cpu_allocs(prof)
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return peak


def profiler_net(prof) -> int:
    """Net bytes a profile's CPU allocation events leave allocated at its end."""
    return sum(size for _, size in _cpu_allocs(prof))


def _cpu_allocs(prof) -> list:
    allocs = []

    def walk(ev):
        if ev.tag == torch._C._profiler._EventType.Allocation:  # noqa: SLF001
            f = ev.extra_fields
            if f.device.type == "cpu":
                allocs.append((ev.start_time_ns, f.alloc_size))
        for c in ev.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    allocs.sort(key=lambda a: a[0])
    return allocs


def inner_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s memory: `t` itself, or for a wrapper tensor subclass
    (torchao's low-bit optimizer states) the tensors it flattens into, recursively."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    names, _ = flatten()
    return [x for n in names if isinstance(getattr(t, n), torch.Tensor) for x in inner_tensors(getattr(t, n))]
