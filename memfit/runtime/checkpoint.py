"""Run an outlined region under non-reentrant activation checkpointing.

`CheckpointedRegion(gm, name)` is the callable a checkpointed region's call node targets:
the forward runs `gm` under `torch.utils.checkpoint.checkpoint(use_reentrant=False,
preserve_rng_state=True)`, so the region saves only its inputs and runs again during
backward. With `selective=True` it is torch's selective activation checkpointing
(`create_selective_checkpoint_contexts`): the outputs of `SAVED_OPERATORS` (matmuls,
convolutions, attention) are kept from the forward and handed back to the recomputation,
which runs every other operator again. Exactness:

- random ops (dropout) replay the same values: checkpoint saves the CPU and device RNG
  states before the forward and restores them around the recomputation. A region whose
  every operator is an aten operator not tagged `nondeterministic_seeded` draws nothing
  random, and skips that (the CPU generator's state is a 5056-byte tensor per region, held
  until the region's backward). Where it is kept, the cost model sees it: on FakeTensors
  the region allocates stand-ins of the same bytes, with the same lifetimes;
- autocast: checkpoint records the autocast state of the forward and recomputes under it;
- buffers mutated in the forward (BatchNorm's running_mean / running_var /
  num_batches_tracked, any in-place update of module state) are updated once per step:
  the forward run notes which buffers changed (tensor version counters), and each
  recomputation restores those buffers afterwards to their values before it ran. In
  training mode BatchNorm's output uses the batch statistics only, so the recomputed
  values equal the forward's. A region whose outputs read a buffer it also mutates would
  see the updated value on recompute; memfit's region choice never hits that case for
  BatchNorm, and other modules doing it are rare (none in torch.nn).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.fx
import torch.utils.checkpoint as tuc


class CheckpointedRegion:
    """Callable running `gm(*args)` with recomputation in backward.

    `buffer_getter()`: tensors owned by the region's modules that the region may mutate
    (buffers reached through call_module nodes); tensor arguments are checked too.
    Not an nn.Module on purpose: the parent graph module does not register it as a child, so
    state_dict keys and parameter ownership stay with the parent.
    """

    def __init__(self, gm: torch.fx.GraphModule, name: str, module_buffers=(), mutable_args=(),
                 selective: bool = False):
        self.gm = gm
        self.name = name
        self.selective = selective                     # keep matmul/attention outputs (SAVED_OPERATORS)
        self._module_buffers = tuple(module_buffers)   # (module, buffer name) the region may update
        self._mutable_args = tuple(mutable_args)       # indices of arguments the region may update
        self.__name__ = f"memfit_{'selective_' if selective else ''}checkpoint_{name}"
        self.__qualname__ = self.__name__
        self.draws_random = may_draw_random(gm)

    def __repr__(self) -> str:
        return f"CheckpointedRegion({self.name}{', selective' if self.selective else ''})"

    def _known_mutable(self, args) -> list[torch.Tensor]:
        out = [args[i] for i in self._mutable_args if isinstance(args[i], torch.Tensor)]
        for mod, bname in self._module_buffers:
            t = mod._buffers.get(bname)  # noqa: SLF001 - read live: .to() replaces buffers
            if t is not None:
                out.append(t)
        return out

    def __call__(self, *args):
        if not torch.is_grad_enabled():
            return self.gm(*args)
        state = {"calls": 0, "mutated": []}
        simulated = self.draws_random and _any_fake(args)
        if simulated:
            # what checkpoint saves for the replay, held as long (by `run`'s frame)
            state["rng"] = torch.empty(rng_state_bytes(args), dtype=torch.uint8)
        # Arguments the region writes (buffers) are not handed to checkpoint: it would save
        # them with their version and refuse to unpack them after the in-place update.
        fixed = {i: args[i] for i in self._mutable_args}
        passed = [i for i in range(len(args)) if i not in fixed]

        def full(a):
            out = list(args)
            for i, v in zip(passed, a):
                out[i] = v
            return out

        def run(*a):
            a = full(a)
            state["calls"] += 1
            if state["calls"] == 1:
                # Known updates (BatchNorm statistics: the kernel writes them without bumping
                # version counters) plus any argument an in-place op changed.
                known = self._known_mutable(a)
                others = [t for t in a if isinstance(t, torch.Tensor) and not t.requires_grad
                          and all(t is not k for k in known)]
                before = [t._version for t in others]
                out = self.gm(*a)
                state["mutated"] = known + [t for t, v in zip(others, before) if t._version != v]
                return out
            return self.gm(*a)   # recomputation in backward, inside _Recompute

        def contexts():
            fwd, rec = (tuc.create_selective_checkpoint_contexts(_saving_policy) if self.selective
                        else (contextlib.nullcontext(), contextlib.nullcontext()))
            return fwd, _Recompute(state, rng_state_bytes(args) if simulated else 0, rec)

        return tuc.checkpoint(run, *[args[i] for i in passed], use_reentrant=False,
                              preserve_rng_state=self.draws_random, context_fn=contexts)


class _Recompute:
    """Around each recomputation in backward: undoes the buffer updates it makes, and on
    FakeTensors holds a stand-in for the generator state torch.random.fork_rng keeps
    meanwhile. Both happen outside `inner` (selective checkpointing's replay mode, which
    would refuse operators the forward did not run)."""

    def __init__(self, state, rng_bytes: int, inner):
        self.state, self.rng_bytes, self.inner = state, rng_bytes, inner

    def __enter__(self):
        self.held = torch.empty(self.rng_bytes, dtype=torch.uint8) if self.rng_bytes else None
        self.keep = [b.detach().clone() for b in self.state["mutated"]]
        return self.inner.__enter__()

    def __exit__(self, *exc):
        try:
            return self.inner.__exit__(*exc)
        finally:
            with torch.no_grad():
                for b, k in zip(self.state["mutated"], self.keep):
                    b.copy_(k)
            self.held = self.keep = None


# What a selective region keeps (dispatch-level operators: what linear, matmul, convolution
# and scaled_dot_product_attention run); every other operator in it is recomputed.
SAVED_OPERATORS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_mm",
                   "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


@functools.cache
def saved_operators() -> frozenset:
    return frozenset(getattr(torch.ops.aten, n).default for n in SAVED_OPERATORS if hasattr(torch.ops.aten, n))


def _saving_policy(ctx, op, *args, **kwargs):
    return (tuc.CheckpointPolicy.MUST_SAVE if op in saved_operators()
            else tuc.CheckpointPolicy.PREFER_RECOMPUTE)


def may_draw_random(gm: torch.fx.GraphModule) -> bool:
    """False when every call in `gm` is known not to draw random numbers (node_may_draw_random)."""
    return any(node_may_draw_random(n) for n in gm.graph.nodes)


def node_may_draw_random(n: torch.fx.Node) -> bool:
    """False when the node is known not to draw random numbers: placeholders, outputs and
    attributes, aten operators not tagged nondeterministic_seeded, operator-module functions,
    and nested regions that draw none. Anything else (a module call, a Python function) may."""
    import operator

    if n.op in ("placeholder", "output", "get_attr"):
        return False
    t = n.target
    if n.op != "call_function":
        return True
    if isinstance(t, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in t.tags
    if isinstance(t, CheckpointedRegion):
        return t.draws_random
    return getattr(t, "__module__", None) != operator.__name__ and t not in (getattr,)


def rng_state_bytes(args) -> int:
    """Bytes of the generator states torch.utils.checkpoint saves for a region called with
    `args`: the CPU generator's, plus each accelerator device's among the tensor arguments."""
    n = torch.get_rng_state().nbytes
    devices = {a.device for a in args if isinstance(a, torch.Tensor) and a.device.type == "cuda"}
    for d in devices:
        n += torch.cuda.get_rng_state(d).nbytes
    return n


def _any_fake(args) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(a, torch.Tensor) and is_fake(a) for a in args)
