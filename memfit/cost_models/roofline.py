"""Seconds: a roofline on nominal device rates (DeviceSpec), per node of a graph.

The time half of the cost model, used to rank plans by predicted extra time: a node costs
max(FLOPs / flops_per_s, bytes moved / bytes_per_s). Nominal rates, not measured ones: the
ranking is what matters, and measured rates (probes) are the next step (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from memfit.ir.fx_utils import size_hint


@dataclass(frozen=True)
class DeviceSpec:
    """Nominal rates for time estimates; a roofline, not a measurement."""

    name: str
    flops_per_s: float
    bytes_per_s: float

    @classmethod
    def for_device(cls, device: torch.device) -> "DeviceSpec":
        if device.type == "cuda":
            # H100 SXM datasheet: 989 TFLOP/s dense bf16 (we assume half of it is reached),
            # 3.35 TB/s HBM3.
            return cls("cuda", 0.5 * 989e12, 3.35e12)
        # A 2-core x86 CPU with AVX2: about 50 GFLOP/s fp32 and 10 GB/s are reachable.
        return cls("cpu", 50e9, 10e9)


_FREE_OPS = ("view", "_unsafe_view", "reshape", "permute", "t", "transpose", "expand", "squeeze", "unsqueeze",
             "slice", "select", "alias", "detach", "as_strided", "split", "unbind", "getitem")


def node_time_s(n: fx.Node, flops_per_s: float, bytes_per_s: float) -> float:
    """Roofline time of one call_function node from its FakeTensor metadata:
    max(FLOPs / flops_per_s, (input + output bytes) / bytes_per_s); views cost nothing."""
    if n.op != "call_function":
        return 0.0
    name = getattr(getattr(n.target, "_overloadpacket", None), "__name__", getattr(n.target, "__name__", ""))
    if name in _FREE_OPS:
        return 0.0

    def val(a):
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    def nbytes(v):
        return size_hint(v.numel()) * v.element_size() if isinstance(v, torch.Tensor) else 0

    out = n.meta.get("val")
    moved = sum(nbytes(val(a)) for a in n.all_input_nodes)
    moved += sum(nbytes(v) for v in (out if isinstance(out, (tuple, list)) else (out,)))
    flops = 0
    packet = getattr(n.target, "_overloadpacket", None)
    if packet is not None:
        from torch.utils.flop_counter import flop_registry

        f = flop_registry.get(packet)
        if f is not None:
            try:
                args = fx.node.map_aggregate(n.args, val)
                kwargs = fx.node.map_aggregate(n.kwargs, val)
                flops = size_hint(f(*args, out_val=out, **kwargs))
            except Exception:  # a formula that does not take these arguments: bytes only
                flops = 0
    return max(flops / flops_per_s, moved / bytes_per_s)


def recompute_time_s(fw: fx.GraphModule, bw: fx.GraphModule, flops_per_s: float, bytes_per_s: float) -> float:
    """Roofline time of the forward ops that run again in backward (names present in both
    graphs: partitioning keeps the joint graph's names)."""
    fw_ops = {n.name for n in fw.graph.nodes if n.op == "call_function"}
    return sum(node_time_s(n, flops_per_s, bytes_per_s) for n in bw.graph.nodes
               if n.op == "call_function" and n.name in fw_ops)


def node_seconds(gm: fx.GraphModule, node_flops: dict, node_out_bytes: dict, spec: "DeviceSpec",
                 node_times: dict | None, val_bytes) -> dict[str, float]:
    """Forward seconds per compute node of a simulated step: the measured time where
    `node_times` (a profile) has the node, else the roofline (FLOPs or bytes moved, whichever
    takes longer) scaled by the profile's ratio of measured to roofline seconds."""
    roof: dict[str, float] = {}
    for n in gm.graph.nodes:
        if n.op not in ("placeholder", "output", "get_attr"):
            moved = node_out_bytes.get(n.name, 0) + sum(val_bytes(a.meta.get("val")) for a in n.all_input_nodes)
            roof[n.name] = max(node_flops.get(n.name, 0) / spec.flops_per_s, moved / spec.bytes_per_s)
    scale = 1.0
    if node_times:
        both = [k for k in roof if k in node_times]
        r, m = sum(roof[k] for k in both), sum(node_times[k] for k in both)
        scale = m / r if r > 0 and m > 0 else 1.0
    return {k: node_times[k] if node_times and k in node_times else v * scale for k, v in roof.items()}
