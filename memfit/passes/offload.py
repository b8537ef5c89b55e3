"""Pass `offload-activations`: chosen saved activations wait in host memory (pinned, side
streams) and come back to the device ahead of their use in backward
(memfit.runtime.offload). Exact: the tensors come back bit for bit.

The nodes are found as quantize-activations finds them (the cost model's saved-tensor probe,
memfit.passes.quantize.saved_tensors_by_node) with the offload gate
(memfit.runtime.offload.skip_reason), and wrapped the same way (passes/infra/saved_hooks.py):
`gm.memfit_offload` opens the step's scope, each chosen node runs inside OffloadedSaves.

It saves device memory only on an accelerator: on CPU the host copy is in the memory the
budget counts, so the pass runs there (tests, the cost model's simulation) but the planner
offers it only on CUDA, and the pass says so in a diagnostic.

`price_candidates` gives the planner, per offloaded tensor, the bytes it frees and the time
of its copies at the measured host-device bandwidth (an upper bound: overlap is left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from memfit.passes.infra.base import EXACT, Diagnostic, Pass, PassContext, PassResult, Promise
from memfit.passes.infra.registry import register_pass
from memfit.passes.infra.saved_hooks import HookedCall, HookedRuntime, wrap_nodes
from memfit.passes.quantize import QuantCandidate, choose_nodes, saved_tensors_by_node
from memfit.runtime.offload import (OffloadConfig, OffloadedSaves, OffloadScope, OffloadStats, _is_fake,
                                    offload_time_s, skip_reason, storage_key, streams_for)

RUNTIME_ATTR = "memfit_offload"


class OffloadRuntime(HookedRuntime):
    """`gm.memfit_offload`: the config, the counters and one step's OffloadScope per forward."""

    def __init__(self, config: OffloadConfig, owner: torch.fx.GraphModule):
        super().__init__(owner)
        self.config = config
        self.stats = OffloadStats()
        self._streams = {}     # device -> streams, made once (CUDA streams are not free)

    def scope(self, exclude: list) -> OffloadScope:
        dev = exclude[0].device if exclude else torch.device("cpu")
        key = (str(dev), bool(exclude) and _is_fake(exclude[0]))   # the cost model's run: fakes
        if key not in self._streams:
            self._streams[key] = streams_for(dev, key[1])
        return OffloadScope(exclude, self._streams[key], dev)

    def extra_repr(self) -> str:
        c = self.config
        return f"min_bytes={c.min_bytes}, prefetch={c.prefetch}"


class OffloadedCall(HookedCall):
    def hooks(self, scope):
        rt = self._runtime
        return OffloadedSaves(rt.config, scope=scope, stats=rt.stats)


def _gate(config: OffloadConfig):
    def gate(t, preexisting):
        return skip_reason(t, config, {storage_key(t)} if preexisting else set(), None)
    return gate


def transfer_bytes_per_s(device: torch.device) -> float:
    """Host-device copy bandwidth: measured on CUDA (memfit.cost_models.probes, cached);
    elsewhere the nominal memory bandwidth (a host copy on CPU is a memory copy)."""
    from memfit.cost_models import probes
    from memfit.cost_models.roofline import DeviceSpec

    if device.type == "cuda":
        return probes.host_transfer_bytes_per_s(device)
    return DeviceSpec.for_device(device).bytes_per_s


def price_candidates(gm: torch.fx.GraphModule, ctx: PassContext | None, config: OffloadConfig, *,
                     saved=None, bytes_per_s: float | None = None) -> list[QuantCandidate]:
    """Per offloadable saved tensor: the bytes it frees on the device and its copies' time."""
    saved = saved if saved is not None else saved_tensors_by_node(gm, ctx, gate=_gate(config))
    if bytes_per_s is None:
        dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
        bytes_per_s = transfer_bytes_per_s(dev)
    out = []
    for recs in saved.values():
        for r in recs:
            if r.skip is None and r.shared_with is None:
                out.append(QuantCandidate(r.node, r.index, r.shape, str(r.dtype).replace("torch.", ""), r.nbytes,
                                          0, r.nbytes, offload_time_s(r.nbytes, bytes_per_s), False))
    return out


@register_pass
@dataclass(frozen=True)
class OffloadActivations(Pass):
    """Keep saved activations in host memory until backward needs them.

    Options: min_bytes (smaller saved tensors stay on the device), prefetch (tensors brought
    back ahead of use), nodes (only these node names; empty: every node that saves an
    offloadable tensor).
    """

    name: ClassVar[str] = "offload-activations"
    promise: ClassVar[Promise] = EXACT     # bit for bit, in fact (tests)

    min_bytes: int = 1 << 20
    prefetch: int = 2
    nodes: tuple[str, ...] = ()
    label: ClassVar[str] = "offloaded"

    def __post_init__(self):
        self.config()  # validates

    def config(self) -> OffloadConfig:
        return OffloadConfig(min_bytes=self.min_bytes, prefetch=self.prefetch)

    def price(self, gm: torch.fx.GraphModule, ctx: PassContext) -> list[QuantCandidate]:
        return price_candidates(gm, ctx, self.config())

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        if hasattr(gm, RUNTIME_ATTR):
            return PassResult(gm, False, {"nodes": 0, "tensors": 0},
                              [Diagnostic(self.name, "graph already offloads; left as is", level="warning")])
        cfg = self.config()
        saved = saved_tensors_by_node(gm, ctx, gate=_gate(cfg))
        picked, diags = choose_nodes(gm, saved, self.nodes, self.name)
        if not picked:
            return PassResult(gm, False, {"nodes": 0, "tensors": 0}, diags)
        dev = next((p.device for p in gm.parameters()), torch.device("cpu"))
        if dev.type != "cuda":
            diags.append(Diagnostic(self.name, f"on {dev.type} the host copies are in the same memory: "
                                    "no device bytes are saved (the planner offers offload on CUDA only)",
                                    level="warning"))
        names = {n.name for n, _ in picked}
        priced = [c for c in price_candidates(gm, ctx, cfg, saved=saved) if c.node in names]
        runtime = OffloadRuntime(cfg, gm)
        wrap_nodes(gm, RUNTIME_ATTR, runtime, [n for n, _ in picked],
                   lambda n: OffloadedCall(runtime, n.op, n.target, n.name), lambda n: {"prefetch": cfg.prefetch})
        return PassResult(gm, True, {"nodes": len(picked), "tensors": sum(len(u) for _, u in picked),
                                     "extra_time_us": int(round(sum(c.time_cost_s for c in priced) * 1e6)),
                                     "bytes_saved": sum(c.bytes_saved for c in priced)}, diags)


def offload_stats(gm: torch.fx.GraphModule) -> OffloadStats | None:
    """The running counters of a graph rewritten by the pass, or None."""
    rt = getattr(gm, RUNTIME_ATTR, None)
    return rt.stats if rt is not None else None

