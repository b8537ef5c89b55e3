"""What a rewritten graph runs under FSDP2 (torch.distributed.fsdp.fully_shard): one call per
FSDP unit, through the unit's FSDP forward hooks, and parameters read when they are used.

FSDP2 gathers a unit's parameters in a forward pre-hook on that module, sets the unsharded
Parameters on the modules that own them, and frees them in a forward post-hook (with
`reshard_after_forward`); the post-hook also registers the pre-backward hooks that gather them
again for backward, and the pre-hook the post-backward hook that reduce-scatters the unit's
gradients. memfit's graph is flat, so memfit.ir.fsdp outlines each unit's nodes into a child
graph and calls it as a `UnitCall`: the call goes through the method
`register_fsdp_forward_method` wraps in those hooks (FSDP2's public way to gather around a
method other than `forward`), and the unit's parameters are read from their modules inside it,
after the gather. Recomputation inside a unit (a CheckpointedRegion in its child) runs during
the unit's backward, when FSDP2 has gathered its parameters again: no second all-gather.

Parameters and buffers outside every unit (the root's) are read by a `LiveAttr` where the graph
used them, from the optimized module, so FSDP2's unsharded root parameters are the ones used.
"""

from __future__ import annotations

import warnings

import torch

# the method name registered with FSDP2 on each unit module
UNIT_METHOD = "_memfit_unit_forward"


def _run_unit(call: "UnitCall", *args):
    return call.run(*args)


class UnitCall:
    """The call_function target of one FSDP unit's node: `unit` the FSDP-wrapped module, `child`
    the outlined graph of its nodes, `slots` [(argument index, parameter path relative to the
    unit)] for the child's parameter inputs, which the call reads from the unit itself."""

    def __init__(self, unit: torch.nn.Module, path: str, child: torch.fx.GraphModule, slots, cloned=()):
        self.unit, self.path, self.child = unit, path, child
        self.slots = sorted(slots)
        # outputs the graph later writes in place: returned as copies, since an in-place op on a
        # view FSDP2 hooked for pre-backward would drop the hook (FSDP2's own warning)
        self.cloned = frozenset(cloned)
        name = path.replace(".", "_") or "root"
        self.__name__ = self.__qualname__ = f"memfit_fsdp_unit_{name}"

    def __repr__(self) -> str:
        return f"UnitCall({self.path})"

    def __call__(self, *args):
        method = getattr(self.unit, UNIT_METHOD, None)
        if method is None:   # not sharded yet (or never): the same computation, unsharded
            return self.run(*args)
        with warnings.catch_warnings():
            # FSDP2 warns when a unit returns a view; memfit's units return views of their last
            # nodes, and those written in place afterwards are copies (self.cloned)
            warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
            return method(self, *args)

    def run(self, *args):
        full = list(args)
        for i, rel in self.slots:
            full.insert(i, self.unit.get_parameter(rel))
        out = self.child(*full)
        if self.cloned:
            out = tuple(o.clone() if i in self.cloned else o for i, o in enumerate(out))
        return out


class LiveAttr:
    """A call_function target reading `owner.<path>` (a parameter or buffer) when it runs, where a
    get_attr node would read the graph module's own copy, which FSDP2 does not replace."""

    def __init__(self, owner: torch.nn.Module, path: str, kind: str):
        self.owner, self.path, self.kind = owner, path, kind
        self.__name__ = self.__qualname__ = "memfit_live_" + path.replace(".", "_")

    def __repr__(self) -> str:
        return f"LiveAttr({self.path})"

    def __call__(self):
        if self.kind == "parameter":
            return self.owner.get_parameter(self.path)
        return self.owner.get_buffer(self.path)


def install_unit_method(unit: torch.nn.Module) -> None:
    """Give `unit` (an FSDPModule) the method UnitCall calls, wrapped in its FSDP hooks."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    if UNIT_METHOD not in unit.__dict__:
        unit.__dict__[UNIT_METHOD] = _run_unit
        register_fsdp_forward_method(unit, UNIT_METHOD)
