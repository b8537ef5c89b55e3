"""Measured seconds per node: one short profile of the step's own forward.

The recompute planner ranks plans by the forward time of what they run again. A roofline on
nominal rates (roofline.py) misjudges that wherever a kernel is far from either roof
(elementwise chains on a CPU, small matmuls, framework overhead per operator), so the
planner measures instead: `profile_forward` runs the captured graph once to warm up and then
`repeats` times (once when the warm-up took over SLOW_FORWARD_S) on the example inputs and
the model's own parameters, under no_grad (no
activation is kept, so it needs less memory than the step itself), and times every call node
(on CUDA with a synchronize around each). Per node it keeps the median, less the timing
harness's own cost per node (measured on a graph of nodes that run no operator). Buffers (BatchNorm
statistics) and the RNG states are put back afterwards: the profile leaves the model as it was.

`step_time_s` predicts a step from it: forward + backward, the backward taken as twice the
forward (two matmuls per forward matmul, the usual 1:2 split; Kaplan et al. 2020), + the
optimizer step at the device's nominal bandwidth (roofline: the bytes of parameters,
gradients and state read and written once).
"""

from __future__ import annotations

import logging
import operator
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.fx

log = logging.getLogger(__name__)

BACKWARD_PER_FORWARD = 2.0
SLOW_FORWARD_S = 0.5     # a warm-up forward longer than this: one timed run instead of `repeats`


@dataclass
class ForwardProfile:
    """Measured forward seconds per call node of one graph."""

    node_s: dict = field(default_factory=dict)
    forward_s: float = 0.0          # their sum
    overhead_s: float = 0.0         # the harness's cost per node, subtracted
    runs: int = 0
    wall_s: float = 0.0             # what profiling took

    def note(self) -> str:
        where = f"profiled in {self.wall_s:.1f} s" if self.wall_s else "from the probe cache"
        return f"per-node forward times measured ({self.runs} runs of the forward, {self.forward_s * 1e3:.2f} ms each, {where})"


def profile_forward(cap, *, repeats: int = 3) -> ForwardProfile:
    """Measure cap.gm's forward per node on real tensors (module doc)."""
    gm = cap.gm
    flat = cap.flat_inputs()
    dev = next((t.device for t in list(flat) + list(gm.parameters()) if isinstance(t, torch.Tensor)),
               torch.device("cpu"))
    samples: dict[str, list[float]] = {}
    timed = _timed(samples, dev)

    log.info("memfit: profiling the forward of %s to price recompute (once per graph and machine)", cap.model_name)
    t_start = time.perf_counter()
    buffers = {k: b.detach().clone() for k, b in gm.named_buffers()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    runs = repeats
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            timed(gm).run(*flat)         # warms up (allocator, kernel selection); not kept
            if time.perf_counter() - t0 > SLOW_FORWARD_S:
                runs = 1                 # a long forward: one timed run (its noise is relatively small)
            samples.clear()
            for _ in range(runs):
                timed(gm).run(*flat)
    finally:
        with torch.no_grad():
            for k, b in gm.named_buffers():
                if k in buffers:
                    b.copy_(buffers[k])
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    med = {k: statistics.median(v) for k, v in samples.items()}
    overhead = _harness_overhead(dev)
    node_s = {k: max(0.0, v - overhead) for k, v in med.items()}
    return ForwardProfile(node_s, sum(node_s.values()), overhead, runs, time.perf_counter() - t_start)


def cached_profile(cap, *, repeats: int = 3) -> ForwardProfile:
    """profile_forward, measured once per graph, input shapes, device and thread count and kept
    with the kernel probes (memfit.cost_models.probe_store: in memory and on disk). Plans are
    then the same in every run on a machine: a refusal's least budget, given back as the
    budget, plans in the next run too, where a fresh profile's noise could move the frontier."""
    import hashlib

    from memfit.cost_models.probe_store import cache_path, device_signature, lookup, memoize, write_cache

    flat = [t for t in cap.flat_inputs() if isinstance(t, torch.Tensor)]
    dev = next((t.device for t in flat + list(cap.gm.parameters())), torch.device("cpu"))
    shapes = ";".join(f"{tuple(t.shape)}:{t.dtype}" for t in flat)
    digest = hashlib.sha1(f"{cap.gm.code}|{shapes}".encode()).hexdigest()[:16]
    key = f"forward_profile|{digest}|{device_signature(dev)}|threads={torch.get_num_threads()}"
    hit = lookup(key)
    if hit is not None:
        return ForwardProfile(dict(hit["node_s"]), hit["forward_s"], hit["overhead_s"], hit["runs"], 0.0)
    prof = profile_forward(cap, repeats=repeats)
    entry = {"kind": "forward_profile", "node_s": prof.node_s, "forward_s": prof.forward_s, "overhead_s": prof.overhead_s, "runs": prof.runs}
    memoize(key, entry)
    write_cache(cache_path(), {key: entry})
    return prof


def _timed(samples: dict, dev: torch.device):
    """An fx Interpreter that appends each call node's seconds to samples[name]."""
    cuda = dev.type == "cuda"

    class _Timed(torch.fx.Interpreter):
        def run_node(self, n):
            if n.op in ("placeholder", "output", "get_attr"):
                return super().run_node(n)
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            out = super().run_node(n)
            if cuda:
                torch.cuda.synchronize(dev)
            samples.setdefault(n.name, []).append(time.perf_counter() - t0)
            return out

    return _Timed


def _harness_overhead(dev: torch.device, nodes: int = 32) -> float:
    """Seconds the timed interpreter adds per node: the median over a graph of `nodes` nodes
    that run no operator (tuple indexing), timed the same way."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    last = x
    for _ in range(nodes):
        last = g.call_function(operator.getitem, (x, 0))
    g.output(last)
    probe = torch.fx.GraphModule(torch.nn.Module(), g)
    samples: dict[str, list[float]] = {}
    for _ in range(3):
        _timed(samples, dev)(probe).run((0,))
    return statistics.median(v for vs in samples.values() for v in vs)


def step_time_s(forward_s: float, optimizer_bytes: int, bytes_per_s: float) -> float:
    """Predicted seconds of one training step (module doc)."""
    return forward_s * (1.0 + BACKWARD_PER_FORWARD) + 2 * optimizer_bytes / bytes_per_s
