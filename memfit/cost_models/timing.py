"""Measured seconds per node: one short profile of the step's own forward and backward.

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

It then times each node's backward where a gradient reaches it (`_timed_backward`: the
node again under autograd on detached inputs, torch.autograd.grad of its outputs; the least
of the runs, less the harness's cost, plus a small operator's share of one backward pass
from memfit.cost_models.overheads). `ForwardProfile.step_s` is the predicted step, forward
plus backward. Without a measured backward `step_time_s` predicts a step as forward +
backward, the backward taken as twice the forward (two matmuls per forward matmul, the usual
1:2 split; Kaplan et al. 2020), + the optimizer step at the device's nominal bandwidth
(roofline: the bytes of parameters, gradients and state read and written once). The split
is far from 1:2 where operators are small: dropout's and attention's backward cost less
than their forward, an embedding's more.
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
    backward_node_s: dict | None = None   # measured backward seconds per node (None: not measured)
    backward_s: float = 0.0         # their sum

    def step_s(self) -> float:
        """Predicted seconds of the unmodified step's forward and backward (no optimizer step):
        the measured backward, else BACKWARD_PER_FORWARD times the forward."""
        if self.backward_node_s is None:
            return self.forward_s * (1.0 + BACKWARD_PER_FORWARD)
        return self.forward_s + self.backward_s

    def note(self) -> str:
        where = f"profiled in {self.wall_s:.1f} s" if self.wall_s else "from the probe cache"
        bwd = f", backward {self.backward_s * 1e3:.2f} ms" if self.backward_node_s is not None else ""
        return (f"per-node forward times measured ({self.runs} runs of the forward, {self.forward_s * 1e3:.2f} ms "
                f"each{bwd}, {where})")


def profile_forward(cap, *, repeats: int = 3, backward: bool = True) -> ForwardProfile:
    """Measure cap.gm's forward per node on real tensors (module doc)."""
    gm = cap.gm
    flat = cap.flat_inputs()
    dev = next((t.device for t in list(flat) + list(gm.parameters()) if isinstance(t, torch.Tensor)),
               torch.device("cpu"))
    samples: dict[str, list[float]] = {}
    bsamples: dict[str, list[float]] = {}
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
            if backward:
                _timed_backward(bsamples, dev)(gm).run(*flat)     # warms up the backward kernels
                bsamples.clear()
                for _ in range(runs):
                    _timed_backward(bsamples, dev)(gm).run(*flat)
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
    back = None
    if backward:
        # less what autograd.grad costs a node beyond its place in one backward pass
        from memfit.cost_models.overheads import region_overhead

        floor = region_overhead(dev).backward_op_s
        harness = _backward_harness(dev)
        # the least of the runs: each node's backward is short, and a pause (another thread,
        # the allocator growing) only ever adds to it
        back = {k: max(0.0, min(v) - harness) + floor for k, v in bsamples.items()}
    return ForwardProfile(node_s, sum(node_s.values()), overhead, runs, time.perf_counter() - t_start,
                          back, sum(back.values()) if back else 0.0)


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
    key = f"step_profile|{digest}|{device_signature(dev)}|threads={torch.get_num_threads()}"
    hit = lookup(key)
    if hit is not None:
        return ForwardProfile(dict(hit["node_s"]), hit["forward_s"], hit["overhead_s"], hit["runs"], 0.0,
                              dict(hit["backward_node_s"]), hit["backward_s"])
    prof = profile_forward(cap, repeats=repeats)
    entry = {"kind": "step_profile", "node_s": prof.node_s, "forward_s": prof.forward_s, "overhead_s": prof.overhead_s,
             "runs": prof.runs, "backward_node_s": prof.backward_node_s, "backward_s": prof.backward_s}
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


def _mutates(n: torch.fx.Node) -> bool:
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return any(a.alias_info is not None and a.alias_info.is_write for a in t._schema.arguments)
    return isinstance(t, str) and t.endswith("_") and not t.endswith("__")


def _timed_backward(samples: dict, dev: torch.device):
    """An fx Interpreter (run under no_grad) that, per call node reached by gradients (from a
    parameter or an input that requires grad), runs the node again under autograd on detached
    copies of its inputs and appends the seconds of its backward (torch.autograd.grad with
    ones as the output gradients) to samples[name]. One node's tensors are live at a time;
    nodes that update a tensor in place are not timed."""
    import torch.utils._pytree as pytree

    cuda = dev.type == "cuda"
    reached: set = set()

    def tensors(x):
        return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]

    class _TimedBackward(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op in ("placeholder", "get_attr"):
                if any(t.requires_grad for t in tensors(out)):
                    reached.add(n)
                return out
            if n.op == "output":
                return out
            params = ([p for p in self.module.get_submodule(n.target).parameters() if p.requires_grad]
                      if n.op == "call_module" else [])
            ins = [a for a in n.all_input_nodes if a in reached]
            if not (ins or params) or not any(t.is_floating_point() for t in tensors(out)):
                return out
            reached.add(n)
            if _mutates(n):
                return out
            kept = {a: self.env[a] for a in ins}
            leaves = []
            try:
                for a in ins:
                    v = self.env[a]
                    if isinstance(v, torch.Tensor) and v.is_floating_point():
                        self.env[a] = v.detach().requires_grad_()
                        leaves.append(self.env[a])
                if not (leaves or params):
                    return out
                with torch.enable_grad():
                    res = super().run_node(n)
                outs = [t for t in tensors(res) if t.requires_grad]
                if outs:
                    grads = [torch.ones_like(t) for t in outs]
                    if cuda:
                        torch.cuda.synchronize(dev)
                    t0 = time.perf_counter()
                    torch.autograd.grad(outs, leaves + params, grads, allow_unused=True)
                    if cuda:
                        torch.cuda.synchronize(dev)
                    samples.setdefault(n.name, []).append(time.perf_counter() - t0)
            finally:
                self.env.update(kept)
            return out

    return _TimedBackward


def _backward_harness(dev: torch.device) -> float:
    """Seconds _timed_backward measures for a node whose backward does almost nothing (x * 1
    on one element): the call's own cost, subtracted from every node's sample."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.aten.mul.Tensor, (x, 1.0)))
    probe = torch.fx.GraphModule(torch.nn.Module(), g)
    samples: dict[str, list[float]] = {}
    x = torch.ones(1, device=dev, requires_grad=True)
    with torch.no_grad():
        for _ in range(9):
            _timed_backward(samples, dev)(probe).run(x)
    return statistics.median(v for vs in samples.values() for v in vs)


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

