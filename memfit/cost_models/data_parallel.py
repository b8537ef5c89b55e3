"""One rank's memory under data parallelism, in the simulated step (analyze_step).

DDP (`ddp_buckets`): the reducer keeps a flat copy of every gradient, its buckets, from its
construction on; they are counted as gradients from the start of the step.

FSDP2 (memfit.fully_shard; `emulate`, FsdpEmulation):

The graph runs on full-size fake parameters, which are not counted; what a rank holds is
allocated beside them, at the points FSDP2 allocates and frees it (torch 2.13's
torch/distributed/fsdp/_fully_shard, read for this):

- persistent: each parameter's shard, dim 0 padded to a multiple of the world size
  (`chunk = ceil(d0 / N)` rows), and the optimizer state of those shards;
- a unit's unshard (pre-forward, and pre-backward when resharded after forward): the flat
  all-gather output (N shards), then the unsharded parameters it is copied out into, then the
  flat output is freed; the unsharded parameters stay until the reshard (post-forward with
  `reshard_after_forward`, else post-backward). The root is not resharded after forward;
- backward prefetch: a unit's pre-backward also unshards the unit before it;
- post-backward: the unsharded gradients are copied into a flat reduce-scatter input and
  freed; its output (one shard of every gradient) holds the sharded gradients; the input is
  kept until the next reduce-scatter or the end of backward (FSDP2 keeps it for its stream);
- units whose inputs need no gradient reduce in FSDP2's final callback, at the end of backward;
- the process group's own scratch inside all-gathers and reduce-scatters, as a fraction of their
  buffers, probed (memfit.cost_models.collective_probe). On gloo, the first all-gather output of
  backward is kept to the end of backward: gloo's work object was seen to hold it that long in
  about half the runs (a reference freed late), so the plan errs high by that one output then.

Communication buffers inside the process group's backend (gloo, NCCL) are not torch
allocations and are not counted.
"""

from __future__ import annotations

import math

import sympy
import torch
import torch.utils._pytree as pytree

from memfit.ir.fx_utils import COMPUTE_OPS

ROOT = ""


def ddp_buckets(tracker, fm, param_fakes) -> list[torch.Tensor]:
    """Stand-ins of DDP's gradient buckets (one per parameter), registered as gradients."""
    with fm:
        buckets = [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in param_fakes]
    for b in buckets:
        tracker.register(b, "gradients")
    total = sum(b.numel() * b.element_size() for b in buckets)
    tracker.notes = [f"DDP gradient buckets: {total} B (a copy of every gradient, held from DDP's construction on) "
                     "counted as gradients"]
    return buckets


def emulate(cap, tracker, fm, params, optimizer) -> tuple["FsdpEmulation", list]:
    """Set up FSDP2's allocations in `tracker`'s step of `cap` (data_parallel="fsdp"): the full
    fake parameters `params` ([(name, fake)]) count nothing from here on, one shard of each is
    registered as the rank's parameters. Returns (the emulation, the shards: what the optimizer
    steps)."""
    if isinstance(optimizer, torch.optim.Optimizer) and any(optimizer.state.values()):
        raise ValueError("data_parallel='fsdp': give an optimizer without state (FSDP2's optimizer is built over "
                         "the sharded parameters, after memfit.fully_shard), or its name ('adamw')")
    emu = FsdpEmulation(cap.gm, tracker, params, cap.fsdp_units, cap.world_size)
    for _, p in params:
        st = tracker.by_storage.get(p.untyped_storage())
        if st is not None:
            st.nbytes, st.expr = 0, sympy.Integer(0)
    shards = emu.make_shards(fm)
    for s in shards:
        tracker.register(s, "parameters")
    tracker.notes = [f"FSDP2 over {cap.world_size} ranks, {len(cap.fsdp_units)} units and the root: one rank's shards "
                     "of parameters, gradients and optimizer state, and each unit's unsharded parameters and gradient "
                     "reduction buffers while FSDP2 holds them (memfit.cost_models.data_parallel)", emu.scratch_note]
    return emu, shards


def shard_numel(shape, world: int) -> int:
    """Elements of one rank's padded shard of a parameter of `shape` (FSDP2 shards dim 0)."""
    if len(shape) == 0:
        return math.ceil(1 / world)
    chunk = math.ceil(int(shape[0]) / world)
    return chunk * math.prod(int(s) for s in shape[1:])


class FsdpEmulation:
    """FSDP2's allocations for the simulated step of `gm` (module doc). `params`: [(name, full
    fake parameter)] in the optimizer's order, `units`: Captured.fsdp_units, `world`: ranks."""

    def __init__(self, gm, tracker, params, units, world: int, reshard_after_forward: bool = True):
        from memfit.ir.fsdp import node_units, unit_of

        self.tracker, self.world, self.reshard = tracker, world, reshard_after_forward
        self.units = tuple(units)
        self.params = [p for _, p in params]
        self.unit_of_param = {id(p): unit_of(name, self.units) or ROOT for name, p in params}
        self.by_unit: dict[str, list] = {u: [] for u in (ROOT,) + self.units}
        for p in self.params:
            self.by_unit[self.unit_of_param[id(p)]].append(p)
        nodes = [n for n in gm.graph.nodes if n.op in COMPUTE_OPS]
        members: dict[str, list] = {}
        for n in nodes:
            for u in node_units(gm, n, self.units):
                members.setdefault(u, []).append(n)
        self.members = {u: set(ns) for u, ns in members.items()}
        self.first = {ns[0]: u for u, ns in members.items()}
        self.last = {ns[-1]: u for u, ns in members.items()}
        self.order = [u for u in members]                        # units in forward order
        self.order.sort(key=lambda u: nodes.index(members[u][0]))
        self.gathered: dict[str, torch.Tensor] = {}
        self.reduced: set = set()
        self.rs_pending = None
        self.shard_of: dict[int, torch.Tensor] = {}
        self.handles: list = []
        self.last_flat = None
        self.pending: dict[str, torch.Tensor] = {}     # issued all-gathers (flat outputs)
        from memfit.cost_models.collective_probe import backend_for, collective_scratch

        self.backend = backend_for(tracker.device or torch.device("cpu"))
        self.scratch, self.scratch_note = collective_scratch(self.backend)
        # gloo: the work object of a backward all-gather can hold its output after FSDP2 lets it
        # go, to the end of backward (seen in about half the runs, one output at a time): one is
        # kept that long here, so the plan errs high by at most that one
        self.lingering = None

    # ------------------------------------------------------------------ shards
    def make_shards(self, fm) -> list[torch.Tensor]:
        """One fake shard per parameter (what a rank keeps, and what its optimizer steps), in
        the parameters' order."""
        out = []
        with fm:
            for p in self.params:
                s = torch.empty(shard_numel(p.shape, self.world), dtype=p.dtype, device=p.device)
                s.requires_grad_(True)
                self.shard_of[id(p)] = s
                out.append(s)
        return out

    # ------------------------------------------------------------------ events
    def _alloc(self, numel: int, dtype, category: str) -> torch.Tensor:
        t = torch.empty(numel, dtype=dtype, device=self.tracker.device or "cpu")
        s = self.tracker.by_storage.get(t.untyped_storage())
        if s is not None:
            s.category = category
        return t

    def _dtype(self, u: str):
        ps = self.by_unit.get(u, ())
        return ps[0].dtype if ps else torch.float32

    def _numel(self, u: str) -> int:
        return sum(shard_numel(p.shape, self.world) for p in self.by_unit.get(u, ())) * self.world

    def issue(self, u: str) -> None:
        """The all-gather: its flat output, and the backend's scratch while it runs."""
        if u in self.pending or u in self.gathered or u in self.reduced or not self.by_unit.get(u):
            return
        self.pending[u] = self._alloc(self._numel(u), self._dtype(u), "parameters")
        k = int(self._numel(u) * self.scratch["all_gather"])
        if k:
            tmp = self._alloc(k, self._dtype(u), "transient")
            del tmp

    def unshard(self, u: str, forward: bool = False) -> None:
        """Issue (unless prefetched) and wait: the copy-out into the unsharded parameters. In
        forward FSDP2 keeps the flat output until the next unit's copy-out is done (its
        AllGatherState, to overlap that copy-out with the next all-gather); otherwise it is
        freed after the copy-out."""
        if u in self.gathered or u in self.reduced or not self.by_unit.get(u):
            return
        self.issue(u)
        flat = self.pending.pop(u)
        self.gathered[u] = self._alloc(self._numel(u), self._dtype(u), "parameters")
        previous, self.last_flat = self.last_flat, (flat if forward and self.world > 1 else None)
        if not forward and self.backend == "gloo" and self.lingering is None:
            self.lingering = flat
        del previous, flat

    def begin_forward(self) -> None:
        self.unshard(ROOT, forward=True)

    def end_forward(self) -> None:
        self.last_flat = None       # the root's post-forward frees the last all-gather output

    def before_node(self, n, env: dict) -> None:
        u = self.first.get(n)
        if u is None:
            return
        inside = self.members[u]
        vals, seen = [], set()
        for m in inside:
            for a in m.all_input_nodes:
                if a in inside or a in seen or a not in env or a.op == "get_attr":
                    continue
                seen.add(a)
                vals += [t for t in pytree.tree_leaves(env[a]) if isinstance(t, torch.Tensor) and t.requires_grad]
        if vals:
            # FSDP2's RegisterPostBackwardFunction on the unit's inputs: once all their gradients are in
            self.handles.append(torch.autograd.graph.register_multi_grad_hook(
                tuple(vals), lambda grads, u=u: self.post_backward(u), mode="all"))
        self.unshard(u, forward=True)

    def after_node(self, n, out, env: dict) -> None:
        u = self.last.get(n)
        if u is None:
            return
        inside = self.members[u]
        outs = []
        for m in inside:
            if any(user not in inside for user in m.users):
                val = out if m is n else env.get(m)
                outs += [t for t in pytree.tree_leaves(val) if isinstance(t, torch.Tensor) and t.requires_grad]
        fired = []

        def pre_backward(grad, u=u):
            if not fired:
                fired.append(True)
                self.unshard(u)
                i = self.order.index(u)
                if i > 0:
                    self.issue(self.order[i - 1])      # FSDP2's backward prefetch: the all-gather only
            return grad

        for t in outs:
            self.handles.append(t.register_hook(pre_backward))
        if self.reshard and u != ROOT:
            self.gathered.pop(u, None)

    def post_backward(self, u: str) -> None:
        if u in self.reduced or not self.by_unit.get(u):
            return
        self.reduced.add(u)
        params = [p for p in self.by_unit[u] if p.requires_grad]
        grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        self.gathered.pop(u, None)               # reshard after backward
        self.rs_pending = None                   # the previous reduce-scatter's input, waited on
        if all(g is None for g in grads):
            return
        rs_in = self._alloc(self._numel(u), self._dtype(u), "gradients")   # gradients copied in
        del grads                                                           # and freed
        out = self._alloc(self._numel(u) // self.world, self._dtype(u), "gradients")
        k = int(self._numel(u) * self.scratch["reduce_scatter"])
        if k:
            tmp = self._alloc(k, self._dtype(u), "transient")
            del tmp
        off = 0
        for p in params:
            k = shard_numel(p.shape, self.world)
            self.shard_of[id(p)].grad = out[off:off + k]      # the sharded gradients: views of it
            off += k
        self.rs_pending = rs_in

    def end_backward(self) -> None:
        """FSDP2's final callback: the units (and the root) whose post-backward did not run
        reduce now; what is pending is waited on and freed."""
        for u in reversed(self.order):
            self.post_backward(u)
        self.post_backward(ROOT)
        self.rs_pending = None
        self.lingering = None
        self.gathered.clear()
        self.pending.clear()
        for h in self.handles:
            h.remove()
        self.handles = []
