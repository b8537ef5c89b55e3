"""OptimizedModule: the one wrapper that runs a rewritten graph behind the model's own calling
convention (memfit.optimize, make_reversible, the CLI, the benchmarks and the tests all use it).

The result of `memfit.optimize` shares everything with the user's model: its child modules,
parameters and buffers are the original objects, registered under the original names, so
`state_dict()` keys and tensors are the same and checkpoints load both ways. Training with
an optimizer over `opt_model.parameters()` trains the user's model.

The captured graph is specialized to the train/eval mode of every module at capture time
(torch.export fixes dropout and BatchNorm behaviour). When the modes differ at call time
(after `.eval()`, say), the module runs the unmodified model instead and logs once why:
memory passes target the training step they were planned for.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


def mode_signature(model: nn.Module) -> tuple:
    return tuple(m.training for m in model.modules())


class OptimizedModule(nn.Module):
    """`original`'s calling convention over `gm` (default: `captured.gm`), a graph captured from
    it (memfit.ir.capture.Captured) and possibly rewritten. `plan`: the MemoryPlan, as
    `.memfit_plan`; `pass_result`: the PassResult that made `gm` (stats, diagnostics), as
    `.pass_result`. `changes_function`: a pass changed the model's function (reversible
    coupling, token merging): then the unmodified model is no stand-in when the train/eval
    modes change, and calling in other modes is refused."""

    def __init__(self, original: nn.Module, captured, gm: torch.fx.GraphModule | None = None, plan=None,
                 *, pass_result=None, changes_function: bool = False, replan=None, before_forward=None):
        super().__init__()
        # called before each forward that builds a graph (arms an optimizer step in backward)
        object.__setattr__(self, "_memfit_before_forward", before_forward)
        gm = captured.gm if gm is None else gm
        object.__setattr__(self, "_memfit_changes_function", changes_function)
        # Shape guard: what each flat input must look like for this graph (None: any size).
        object.__setattr__(self, "_memfit_expected", _expected_inputs(gm))
        # replan(args, kwargs) -> OptimizedModule for inputs this graph was not made for
        object.__setattr__(self, "_memfit_replan", replan)
        object.__setattr__(self, "_memfit_variants", {})
        # Not registered: the original's children are registered directly below, so
        # parameters appear once and under their original names.
        object.__setattr__(self, "_memfit_original", original)
        object.__setattr__(self, "_memfit_captured", captured)
        object.__setattr__(self, "_memfit_gm", gm)
        object.__setattr__(self, "_memfit_modes", mode_signature(original))
        object.__setattr__(self, "_memfit_warned", False)
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        non_persistent = getattr(original, "_non_persistent_buffers_set", set())
        for name, b in original.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in non_persistent)
        self.training = original.training
        self.memfit_plan = plan
        self.pass_result = pass_result
        # The Parameter objects the graph reads: replacing one afterwards (fully_shard,
        # load_state_dict(assign=True), `m.weight = nn.Parameter(...)`) would leave the graph
        # training the old one, so forward checks they are still the module's.
        object.__setattr__(self, "_memfit_params", tuple((m, k, p) for m in self.modules()
                                                         for k, p in m._parameters.items() if p is not None))

    def __reduce_ex__(self, protocol):
        from memfit.errors import MemfitError
        raise MemfitError("an optimized module holds generated graph code and cannot be pickled (torch.save of the "
                          "module): save its state_dict(), whose keys and tensors are the model's, and call "
                          "memfit.optimize again after loading")

    def __deepcopy__(self, memo):
        # copy.deepcopy(model) after optimize_ (an EMA or teacher copy) copies this module with
        # the model: graph, parameters and all, through the same memo, so the copy runs its own
        # weights. torch's pytree warns about its own specs while graph modules are copied.
        import copy
        import warnings

        new = type(self).__new__(type(self))
        memo[id(self)] = new
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            for k, v in self.__dict__.items():
                new.__dict__[k] = copy.deepcopy(v, memo)
            copy_call_targets(new.__dict__["_memfit_gm"], memo)
        return new

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The rewritten GraphModule (flat inputs, flat tuple output)."""
        return self._memfit_gm

    @property
    def original(self) -> nn.Module:
        return self._memfit_original

    def train(self, mode: bool = True):
        # nn.Module.train recurses into the children, which are the original's: keep the
        # original's own flag in step too, so mode_signature compares like with like.
        super().train(mode)
        self._memfit_original.training = mode
        return self

    def forward(self, *args, **kwargs):
        original = self._memfit_original
        if mode_signature(original) != self._memfit_modes:
            if self._memfit_changes_function:
                from memfit.errors import MemfitError
                raise MemfitError(
                    f"module modes changed since memfit captured {type(original).__name__} (train/eval), and its "
                    "graph was rewritten by a pass that changes the function (reversible, token-merge): the "
                    "unmodified model would compute something else. Rewrite it again in this mode (set the "
                    "modes first, then call memfit.optimize / make_reversible)")
            if not self._memfit_warned:
                log.info("module modes changed since memfit captured %s (train/eval); running the "
                         "unmodified model; call memfit.optimize again to plan for this mode",
                         type(original).__name__)
                object.__setattr__(self, "_memfit_warned", True)
            return type(original).forward(original, *args, **kwargs)
        _check_parameters(self)
        if self._memfit_before_forward is not None and torch.is_grad_enabled():
            self._memfit_before_forward()
        cap = self._memfit_captured
        flat = cap.flat_inputs(tuple(args), kwargs)
        why = _mismatch(flat, self._memfit_expected)
        if why is not None:
            return self._variant(flat, why, args, kwargs)(*args, **kwargs)
        return cap.unflatten_output(self._memfit_gm(*flat))

    def _variant(self, flat, why: str, args, kwargs) -> "OptimizedModule":
        """The module planned for these inputs (a smaller last batch, a longer sequence):
        re-planned once per input signature, with the same budget in bytes and techniques."""
        from memfit.errors import MemfitError

        key = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", repr(x)) for x in flat)
        sub = self._memfit_variants.get(key)
        if sub is None:
            name = type(self._memfit_original).__name__
            if getattr(self, "_memfit_fsdp_units", None) is not None:
                raise MemfitError(f"{name} was planned by memfit for other inputs: {why}. Under FSDP2 (memfit."
                                  "fully_shard) the graph holds for the inputs it was planned for, and it cannot be "
                                  "planned again once sharded: keep every batch that size (drop_last=True), or "
                                  "optimize and shard once per input size")
            if self._memfit_replan is None:
                raise MemfitError(f"{name} was captured by memfit for other inputs: {why}. The graph holds only "
                                  "for the inputs it was made for; rewrite it again with these example inputs")
            log.info("memfit: %s; planning %s again for these inputs (once per input signature)", why, name)
            sub = self._memfit_replan(tuple(args), dict(kwargs))
            self._memfit_variants[key] = sub
        return sub

    def extra_repr(self) -> str:
        p = self.memfit_plan
        if p is None:
            return ""
        from memfit.budget import format_bytes
        return f"memfit: predicted peak {format_bytes(p.peak_bytes)}, {len(p.decisions)} decisions"


def copy_call_targets(gm: torch.fx.GraphModule, memo: dict) -> None:
    """After copy.deepcopy of `gm`: its graph's call_function targets that are memfit's runtime
    objects (a CheckpointedRegion, a ReversibleStack's runner, an FSDP UnitCall) are still the
    original's, because fx copies a graph's nodes with their targets as they are. Those objects
    hold child graphs that call modules (and read buffers) of the original: the copy would run,
    and train, the original's weights. Replace them by copies through the same `memo`, in nested
    child graphs too, and recompile."""
    import copy

    for mod in list(gm.modules()):
        if not isinstance(mod, torch.fx.GraphModule):
            continue
        changed = False
        for n in mod.graph.nodes:
            t = n.target
            if n.op == "call_function" and _is_runtime_object(t):
                new = copy.deepcopy(t, memo)
                for v in vars(new).values():
                    if isinstance(v, torch.fx.GraphModule):
                        copy_call_targets(v, memo)
                n.target = new
                changed = True
        if changed:
            mod.recompile()


def _is_runtime_object(t) -> bool:
    """An instance of a memfit class used as a graph's call target (not a function or a class)."""
    import types

    if isinstance(t, (types.FunctionType, types.BuiltinFunctionType, type, types.MethodType)):
        return False
    return type(t).__module__.startswith("memfit.")


def _check_parameters(om: OptimizedModule) -> None:
    """MemfitError when a parameter the graph reads is no longer the module's (see __init__)."""
    kept = om._memfit_params
    if kept is None:   # sharded by memfit.fully_shard: FSDP2 replaces them, the graph reads them live
        return
    if all(m._parameters.get(k) is p for m, k, p in kept):
        return
    from memfit.errors import MemfitError

    ids = {id(p) for _, _, p in kept}
    name, new = next(((n, p) for n, p in om.named_parameters() if id(p) not in ids), (None, None))
    model = type(om._memfit_original).__name__
    if new is not None and is_sharded(new):
        raise MemfitError(
            f"{model}'s parameter {name!r} is sharded now (a DTensor: torch.distributed.fsdp.fully_shard after "
            "memfit.optimize); the rewritten graph reads the unsharded parameters it captured, so training would "
            "update nothing. Shard with memfit.fully_shard(module, mesh=...) instead, which splits the graph at "
            "FSDP's units (plan with memfit.optimize(..., data_parallel='fsdp'); docs/distributed.md)")
    what = f"parameter {name!r} was replaced" if name is not None else "the set of parameters changed"
    raise MemfitError(
        f"{model}'s {what} after memfit.optimize (by assignment, load_state_dict(assign=True), or a wrapper); the "
        "rewritten graph reads the parameters it captured and would train those. Load weights in place "
        "(load_state_dict without assign), or call memfit.optimize again after replacing them")


def is_sharded(t) -> bool:
    """A DTensor (torch.distributed.tensor), as FSDP2 and tensor parallelism make parameters."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch build without distributed
        return False
    return isinstance(t, DTensor)


def _expected_inputs(gm: torch.fx.GraphModule) -> list:
    """Per placeholder: (dtype, sizes with None where the graph is symbolic), or None for a
    non-tensor input."""
    out = []
    for n in gm.graph.find_nodes(op="placeholder"):
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            out.append((v.dtype, [s if isinstance(s, int) else None for s in v.shape]))
        else:
            out.append(None)
    return out


def _mismatch(flat, expected) -> str | None:
    """Why these flat inputs are not ones the graph was made for, or None."""
    for i, (x, exp) in enumerate(zip(flat, expected)):
        if exp is None:
            continue
        dtype, dims = exp
        if not isinstance(x, torch.Tensor):
            return f"input {i} is a {type(x).__name__} where a tensor was captured"
        if x.dtype != dtype:
            return f"input {i} has dtype {x.dtype} where {dtype} was captured"
        if x.dim() != len(dims) or any(d is not None and d != s for d, s in zip(dims, x.shape)):
            shown = [d if d is not None else "*" for d in dims]
            return f"input {i} has shape {list(x.shape)} where {shown} was captured"
    return None
