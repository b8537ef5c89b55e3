"""What the framework costs beyond the operators' own kernels, probed once per machine.

A recomputed region is more than its operators' forward run again: torch.utils.checkpoint
packs and unpacks every saved tensor through hooks, replays the forward under autograd, and
saves and restores the RNG states where the region draws random numbers. On a CPU that is
about half a millisecond per region and some 20 us per operator, more than the recompute
itself of a small block; on a GPU it is host time that may or may not hide behind kernels.
`region_overhead` measures it on small blocks (memfit.cost_models.probe_store caches the
result per device signature, thread count and torch version), and the checkpoint planner
adds it per region (memfit.planning.checkpoint.CheckpointPlanner.region_s), so plans of
fewer, longer regions win where their cost says they should.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch
import torch.fx

log = logging.getLogger(__name__)


REGION_PROBE_ROUNDS = 31
REGION_PROBE_OPS = (2, 34)      # operators in the two probe blocks (a matmul, then tanh)


@dataclass(frozen=True)
class RegionOverhead:
    """Seconds a recomputed region adds to a step beyond its operators' forward, measured by
    `region_overhead`: `fixed_s` per region (torch.utils.checkpoint's frame in forward,
    memfit's region call, the replay's set-up in backward) and `per_op_s` per operator it
    recomputes (the saved-tensor hooks that pack and unpack each saved tensor, the replay's
    dispatch, recording autograd's graph, which the no_grad profile that priced the operator
    did not). `selective_*`: the same for a selective region (its policy is asked per
    operator). `random_s`: saving and restoring the RNG states, for a region that draws random
    numbers. On a CPU a region costs about half a millisecond plus some 20 us per operator,
    which dwarfs the recompute of a small block; the planner adds it to each region's time."""

    fixed_s: float = 0.0
    per_op_s: float = 0.0
    selective_fixed_s: float = 0.0
    selective_per_op_s: float = 0.0
    random_s: float = 0.0
    backward_op_s: float = 0.0   # a small operator's backward inside one backward pass (with recording its node)

    def seconds(self, ops: int, *, selective: bool = False, random: bool = False) -> float:
        """Overhead of one region recomputing `ops` operators."""
        if selective:
            t = self.selective_fixed_s + self.selective_per_op_s * ops
        else:
            t = self.fixed_s + self.per_op_s * ops
        return t + (self.random_s if random else 0.0)

    def note(self) -> str:
        return (f"each recomputed region costs {self.fixed_s * 1e6:.0f} us + {self.per_op_s * 1e6:.1f} us per operator "
                f"(selective {self.selective_fixed_s * 1e6:.0f} us + {self.selective_per_op_s * 1e6:.1f} us; "
                f"+{self.random_s * 1e6:.0f} us with dropout), probed")


class _ProbeBlock(torch.nn.Module):
    def __init__(self, device, ops: int, random: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8, device=device))
        self.ops, self.random = ops, random

    def forward(self, x):
        h = x @ self.w
        for _ in range(self.ops - 1):
            h = torch.tanh(h)
        return torch.nn.functional.dropout(h, 0.1, True) if self.random else h


def region_overhead(device: torch.device) -> RegionOverhead:
    """RegionOverhead of `device` at the current thread count, probed once per device
    signature, thread count and torch version and cached with the kernel probes: blocks of
    REGION_PROBE_OPS small operators (an 8x8 matmul, then tanh) stepped REGION_PROBE_ROUNDS
    times plain and as regions (whole, selective; the small one also with dropout),
    alternated. Per block the overhead is the medians' difference less the block's no_grad
    forward (what the profile prices); a line through the two blocks gives fixed and per-op
    seconds; the plain blocks' steps less their forward give `backward_op_s`."""
    from memfit.cost_models.probe_store import cache_path, device_signature, lookup, memoize, write_cache

    device = torch.device(device)
    key = f"region_overhead2|{device_signature(device)}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    hit = lookup(key)
    if hit is None:
        hit = dict(_probe_regions(device), kind="region_overhead")
        memoize(key, hit)
        write_cache(cache_path(), {key: hit})
        log.info("memfit: probed recompute regions on %s: %s", device, _overhead(hit).note())
    return _overhead(hit)


def _overhead(entry: dict) -> RegionOverhead:
    return RegionOverhead(*(entry[k] for k in ("fixed_s", "per_op_s", "selective_fixed_s", "selective_per_op_s",
                                               "random_s", "backward_op_s")))


def _probe_regions(device: torch.device) -> dict:
    from memfit.runtime.checkpoint import CheckpointedRegion

    cuda = device.type == "cuda"
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None

    def clock(fn):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    x = torch.randn(8, 8, device=device, requires_grad=True)
    blocks = {(n, r): torch.fx.symbolic_trace(_ProbeBlock(device, n, r))
              for n in REGION_PROBE_OPS for r in (False, True) if n == REGION_PROBE_OPS[0] or not r}
    runs = {}
    for (n, r), g in blocks.items():
        runs[("plain", n, r)] = g
        runs[("whole", n, r)] = CheckpointedRegion(g, "probe")
        if not r:
            runs[("selective", n, r)] = CheckpointedRegion(g, "probe", selective=True)
    samples: dict = {k: [] for k in list(runs) + [("forward", n, r) for n, r in blocks]}
    try:
        for rnd in range(REGION_PROBE_ROUNDS + 3):      # 3 warm-up rounds
            for k, fn in runs.items():
                dt = clock(lambda fn=fn: fn(x).sum().backward())
                if rnd >= 3:
                    samples[k].append(dt)
            for (n, r), g in blocks.items():
                with torch.no_grad():
                    dt = clock(lambda g=g: g(x))
                if rnd >= 3:
                    samples[("forward", n, r)].append(dt)
    finally:
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    med = {k: statistics.median(v) for k, v in samples.items()}

    def extra(kind, n, r=False):
        return med[(kind, n, r)] - med[("plain", n, r)] - med[("forward", n, r)]

    lo, hi = REGION_PROBE_OPS
    out = {}
    for kind, prefix in (("whole", ""), ("selective", "selective_")):
        per_op = max(0.0, (extra(kind, hi) - extra(kind, lo)) / (hi - lo))
        out[prefix + "per_op_s"] = per_op
        out[prefix + "fixed_s"] = max(0.0, extra(kind, lo) - per_op * lo)
    out["random_s"] = max(0.0, extra("whole", lo, True) - extra("whole", lo))
    # a plain step less its no_grad forward: recording the graph, then the backward
    out["backward_op_s"] = max(0.0, ((med[("plain", hi, False)] - med[("forward", hi, False)])
                                     - (med[("plain", lo, False)] - med[("forward", lo, False)])) / (hi - lo))
    return out
