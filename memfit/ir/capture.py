"""Capture: an nn.Module plus example inputs becomes a torch.fx GraphModule.

Two roads (see docs/architecture.md):
- `symbolic_trace`, the fast path for plain modules whose forward has no data-dependent
  Python control flow. Leaf modules (nn.Linear, nn.Conv2d, ...) stay `call_module` nodes.
- `torch.export.export(strict=False)`, the main road: training-IR aten ops, parameters as
  `get_attr` nodes with their original names, `nn_module_stack` in node.meta. Every input
  dimension is exported as `Dim.AUTO`, so batch (and sequence) stay symbolic where the
  model allows it. Transformers 5 models go this way.

In both, every tensor-valued node gets `node.meta["val"]`, a FakeTensor: shapes and dtypes
without compute or memory. The captured module shares parameters and buffers with the
user's model (same tensor objects), so its state_dict equals the original's; nothing of
the user's model is modified.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree

from memfit.errors import CaptureError
from memfit.ir.fx_utils import fake_state
from memfit.ir.fx_utils import module_path as node_module_path  # noqa: F401 - the name tests and docs use

log = logging.getLogger(__name__)

METHODS = ("auto", "symbolic_trace", "export")


@dataclass
class Captured:
    """A captured model.

    `gm`'s placeholders are the flattened user inputs (in `pytree` order of
    `(example_inputs, example_kwargs)`); `out_spec` rebuilds the model's output structure
    (ModelOutput, tuple, ...) from the flat list the graph returns.
    """

    gm: torch.fx.GraphModule
    method: str
    example_inputs: tuple
    example_kwargs: dict
    in_spec: Any
    out_spec: Any | None
    training: bool
    model_name: str
    notes: list[str] = field(default_factory=list)
    # how the model will train: None (one process) or "ddp" (DistributedDataParallel around it:
    # its gradient buckets are in every plan, memfit.cost_models.memory)
    data_parallel: str | None = None
    # with data_parallel="fsdp": the module paths FSDP2 will shard as units (memfit.ir.fsdp), and
    # the ranks sharing them
    fsdp_units: tuple = ()
    world_size: int = 1

    def flat_inputs(self, args: tuple | None = None, kwargs: dict | None = None) -> list:
        args = self.example_inputs if args is None else args
        kwargs = self.example_kwargs if kwargs is None else kwargs
        flat, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise CaptureError(f"inputs have a different structure than at capture: {spec} vs {self.in_spec}")
        return flat

    def unflatten_output(self, flat_out):
        if self.out_spec is None:
            return flat_out
        return pytree.tree_unflatten(list(flat_out), self.out_spec)


def capture(model: torch.nn.Module, example_inputs: tuple = (), example_kwargs: dict | None = None,
            *, method: str = "auto", dynamic: bool = True) -> Captured:
    """Capture `model` as a GraphModule with FakeTensor metadata on every node.

    `dynamic`: export every input dimension as `Dim.AUTO`, so the graph stays valid for other
    batch sizes and sequence lengths (needed for symbolic planning; about twice the export
    time of a static capture on GPT-2-small).

    Raises CaptureError naming the module and the reason, with what to try.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise CaptureError(f"unknown capture method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    example_kwargs = dict(example_kwargs or {})
    _refuse_sharded(model)
    with _own_forward(model), quiet_torch():
        cap = _capture(model, example_inputs, example_kwargs, method, dynamic)
    _keep_user_checkpoints(cap)
    return cap


def _refuse_sharded(model: torch.nn.Module) -> None:
    """CaptureError for a model FSDP2 already shards (fully_shard, then memfit): capture would
    trace FSDP's hooks and all-gathers (it fails inside them), and the graph would hold no
    sharding."""
    from memfit.ir.module import is_sharded

    fsdp = None
    try:
        from torch.distributed.fsdp import FSDPModule
        fsdp = next((n or "(root)" for n, m in model.named_modules() if isinstance(m, FSDPModule)), None)
    except ImportError:  # pragma: no cover - a torch build without distributed
        pass
    sharded = next((n for n, p in model.named_parameters() if is_sharded(p)), None)
    if fsdp is not None or sharded is not None:
        where = f"module {fsdp!r} is wrapped by fully_shard" if fsdp else f"parameter {sharded!r} is a DTensor"
        raise CaptureError(
            f"{type(model).__name__} is sharded ({where}): memfit captures the unsharded model. For FSDP2, "
            "optimize first, then shard with memfit: om = memfit.optimize(model, budget, ..., data_parallel='fsdp'); "
            "memfit.fully_shard(om, mesh=mesh) (docs/distributed.md). Tensor parallelism is not supported")


@contextlib.contextmanager
def quiet_torch():
    """torch's own log lines, warnings and prints to stderr while capturing (a failed road
    dumps its partial graph and guards there before memfit's one-line CaptureError) are kept out
    of the user's terminal; `logging.getLogger("torch")` at DEBUG, or MEMFIT_TORCH_LOGS=1, lets
    them through."""
    import io
    import logging
    import os
    import warnings

    if os.environ.get("MEMFIT_TORCH_LOGS") or logging.getLogger("torch").isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [lg for name, lg in logging.Logger.manager.loggerDict.items()
               if (name == "torch" or name.startswith("torch.")) and isinstance(lg, logging.Logger)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.filterwarnings("ignore", module=r"torch(\..*)?$")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _own_forward(model):
    """Capture the model's own forward, not the one memfit.optimize_ put on the instance
    (which runs a graph captured before)."""
    patched = model.__dict__.get("forward") if "_memfit_optimized" in model.__dict__ else None
    if patched is None:
        yield
        return
    del model.__dict__["forward"]
    try:
        yield
    finally:
        model.__dict__["forward"] = patched


def _capture(model, example_inputs, example_kwargs, method, dynamic) -> Captured:
    name = type(model).__name__
    errors: list[str] = []
    if method in ("auto", "symbolic_trace") and not _looks_like_transformers(model):
        try:
            return _capture_symbolic_trace(model, example_inputs, example_kwargs)
        except Exception as e:  # noqa: BLE001 - any tracing failure sends us down the export road
            errors.append(f"symbolic_trace: {_one_line(e)}")
            if method == "symbolic_trace":
                raise CaptureError(
                    f"cannot capture {name} with torch.fx.symbolic_trace: {_one_line(e)}. "
                    "Try method='export' (torch.export handles control flow on shapes).") from e
            log.info("symbolic_trace failed on %s (%s); using torch.export", name, _one_line(e))
    try:
        return _capture_export(model, example_inputs, example_kwargs, dynamic)
    except CaptureError:
        raise
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.export: {_one_line(e)}")
        raise CaptureError(
            f"cannot capture {name}: " + "; ".join(errors) + ". What to try: make data-dependent "
            "control flow static (torch.cond, or branch on shapes rather than values), build "
            "Hugging Face models with use_cache=False, or check the example inputs match forward()'s "
            "signature.") from e


class _FunctionCall:
    """A custom torch.autograd.Function kept whole in a symbolic_trace graph: the node calls
    `Fn.apply`, so its forward and backward run as the user wrote them (memfit never traces
    into it). One instance per class, so the graph's nodes read `apply_<Name>`."""

    _instances: dict = {}

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = self.__qualname__ = f"apply_{fn.__name__}"

    @classmethod
    def of(cls, fn) -> "_FunctionCall":
        if fn not in cls._instances:
            cls._instances[fn] = cls(fn)
        return cls._instances[fn]

    def __call__(self, *args, **kwargs):
        return self.fn.apply(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.fn.__qualname__}.apply"


def _user_function(fn) -> bool:
    return not str(getattr(fn, "__module__", "")).startswith("torch.")


@contextlib.contextmanager
def _autograd_functions(applied: list, *, preserve_meta: bool = False):
    """While tracing: a user's autograd.Function applied to fx Proxies becomes one call node
    (symbolic_trace keeps it opaque); applied to anything else (torch.export's tracing), its
    class is recorded in `applied`, because export would inline its forward and lose its
    backward."""
    base = torch.autograd.function.Function
    original = base.__dict__["apply"]

    import torch.utils.checkpoint as tuc

    reentrant = tuc.CheckpointFunction

    def apply(fn, *args, **kwargs):
        proxies = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.fx.Proxy)]
        if fn is reentrant and proxies:   # torch.utils.checkpoint(use_reentrant=True): keep it
            with _traced_region(proxies[0].tracer.graph):
                return original.__func__(fn, *args, **kwargs)
        if _user_function(fn) or fn is reentrant:
            if proxies:
                return proxies[0].tracer.create_proxy("call_function", _FunctionCall.of(fn), args, kwargs)
            applied.append(fn)
        return original.__func__(fn, *args, **kwargs)

    generator = tuc._checkpoint_without_reentrant_generator

    def annotated(*args, **kwargs):
        # torch.utils.checkpoint(use_reentrant=False) runs the function between the two
        # yields of this generator: the nodes traced there are the user's region.
        proxies = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.fx.Proxy)]
        region = _traced_region(proxies[0].tracer.graph) if proxies else _annotated_region()
        with region:
            gen = generator(*args, **kwargs)
            yield next(gen)
        yield from gen

    base.apply = classmethod(apply)
    tuc._checkpoint_without_reentrant_generator = annotated
    try:
        # export copies annotations into node.meta["custom"] only with node meta preserved;
        # symbolic_trace would then take nn_module_stack from it too (and lose it)
        with (fx_traceback.preserve_node_meta() if preserve_meta else contextlib.nullcontext()):
            yield
    finally:
        base.apply = original
        tuc._checkpoint_without_reentrant_generator = generator


_USER_CKPT = "memfit_user_checkpoint"
_user_regions = [0]


@contextlib.contextmanager
def _annotated_region():
    """Nodes traced inside (torch.export) get node.meta["custom"][_USER_CKPT] = a new region number."""
    _user_regions[0] += 1
    with fx_traceback.annotate({_USER_CKPT: _user_regions[0]}):
        yield


@contextlib.contextmanager
def _traced_region(graph: torch.fx.Graph):
    """The same for symbolic_trace: the nodes added to `graph` inside are tagged after."""
    _user_regions[0] += 1
    k, before = _user_regions[0], set(graph.nodes)
    yield
    for n in graph.nodes:
        if n not in before:
            n.meta.setdefault("custom", {})[_USER_CKPT] = k


def _keep_user_checkpoints(cap: "Captured") -> None:
    """The user's own torch.utils.checkpoint regions, traced through by both capture roads,
    recomputed again: each becomes a memfit checkpointed region (the same recomputation, RNG
    replayed), so the plan and the optimized module hold what the user's model holds."""
    from memfit.ir.outline import checkpoint_region

    groups: dict[int, list] = {}
    for n in cap.gm.graph.nodes:
        k = (n.meta.get("custom") or {}).get(_USER_CKPT)
        if k is not None and n.op in ("call_function", "call_method", "call_module"):
            groups.setdefault(k, []).append(n)
    for i, nodes in enumerate(groups.values()):
        label = f"user checkpoint {i}"
        try:
            checkpoint_region(cap.gm, nodes, f"user_ckpt_{i}", label)
        except Exception as e:  # noqa: BLE001 - said in the plan, never silently dropped
            cap.notes.append(f"the model's torch.utils.checkpoint region {i} could not be kept "
                             f"({type(e).__name__}: {e}); it is planned without recomputation")
    if groups:
        cap.notes.append(f"the model's own torch.utils.checkpoint kept: {len(groups)} recomputed region(s)")


def _plain(obj):
    """fx's immutable_dict / immutable_list as the dict / list the model built."""
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    if isinstance(obj, immutable_dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, immutable_list):
        return [_plain(v) for v in obj]
    if type(obj) is tuple:
        return tuple(_plain(v) for v in obj)
    return obj


def _looks_like_transformers(model) -> bool:
    # transformers' forward methods use **kwargs unpacking and output dataclasses that
    # symbolic_trace cannot handle (measured on BERT, GPT-2, ViT, ResNet, ConvNeXt, Swin).
    return type(model).__module__.startswith("transformers.")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0] if text else type(e).__name__
    return f"{type(e).__name__}: {first}"[:300]


def _capture_symbolic_trace(model, args, kwargs) -> Captured:
    if kwargs:
        raise CaptureError("symbolic_trace path takes positional inputs only")
    if any(not isinstance(a, torch.Tensor) for a in pytree.tree_leaves(args)):
        raise CaptureError("symbolic_trace path takes tensor inputs only")
    if len(pytree.tree_leaves(args)) != len(args):
        raise CaptureError("symbolic_trace path takes flat tensor inputs only")
    # Tracing reads module attributes; it never writes them, so the user's model is safe.
    with _autograd_functions([]):
        gm = torch.fx.symbolic_trace(model)
    _propagate_fake(gm, args)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    # Normalize the output to a flat tuple so analysis code sees one shape of graph; fx keeps
    # node arguments in immutable containers, the model returned plain ones.
    flat, out_spec = pytree.tree_flatten(_plain(out_node.args[0]))
    out_node.args = (tuple(flat),)
    gm.recompile()
    in_spec = pytree.tree_flatten((tuple(args), {}))[1]
    return Captured(gm=gm, method="symbolic_trace", example_inputs=args, example_kwargs={},
                    in_spec=in_spec, out_spec=out_spec, training=model.training,
                    model_name=type(model).__name__)


def _capture_export(model, args, kwargs, dynamic: bool = True) -> Captured:
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    dyn = _dynamic_shapes(model, args, kwargs) if dynamic else None
    applied: list = []
    try:
        with _autograd_functions(applied, preserve_meta=True):
            ep = torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dyn)
    except Exception as e:
        raise CaptureError(
            f"cannot capture {type(model).__name__} with torch.export: {_one_line(e)}. "
            "What to try: make data-dependent control flow static (torch.cond, or branch on "
            "shapes rather than values); build Hugging Face models with use_cache=False; check "
            "the example inputs match forward()'s signature.") from e
    if applied:
        names = ", ".join(sorted({f"{c.__module__}.{c.__qualname__}" for c in applied}))
        if any(c is torch.utils.checkpoint.CheckpointFunction for c in applied):
            raise CaptureError(
                f"cannot capture {type(model).__name__} faithfully: it uses torch.utils.checkpoint with "
                "use_reentrant=True, which torch.export traces into without its recomputation. What works: "
                "use_reentrant=False (memfit keeps that checkpointing), or leave recomputation to memfit.")
        raise CaptureError(
            f"cannot capture {type(model).__name__} faithfully: it applies the custom torch.autograd.Function "
            f"{names}, and torch.export traces through its forward and drops its backward (the gradient "
            "would be wrong). What works: torch.compile(model, backend='memfit') keeps it; a model that "
            "torch.fx.symbolic_trace can follow keeps it as one opaque call (method='symbolic_trace').")
    gm = ep.module()
    # Flatten the export module's pytree calling convention: placeholders become the flat
    # leaves, the output a flat tuple; we keep the specs to rebuild structures.
    out_spec = gm._out_spec  # noqa: SLF001 - the unlifted module keeps its output spec here
    _strip_pytree_codegen(gm)
    notes = []
    for n in gm.graph.nodes:
        if n.op == "placeholder" and "val" not in n.meta:
            notes.append(f"placeholder {n.name} has no shape metadata")
    return Captured(gm=gm, method="export", example_inputs=args, example_kwargs=kwargs,
                    in_spec=in_spec, out_spec=out_spec, training=model.training,
                    model_name=type(model).__name__, notes=notes)


def _dynamic_shapes(model, args, kwargs):
    """Dim.AUTO for every dimension of every input. With keyword inputs, export wants the
    specs keyed by forward()'s parameter names."""
    if not kwargs:
        return pytree.tree_map(_auto_dims, args)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return (pytree.tree_map(_auto_dims, args), {k: pytree.tree_map(_auto_dims, v) for k, v in kwargs.items()})
    return {name: pytree.tree_map(_auto_dims, v) for name, v in bound.arguments.items()}


def _auto_dims(x):
    if isinstance(x, torch.Tensor):
        return {i: torch.export.Dim.AUTO for i in range(x.dim())}
    return None


def _strip_pytree_codegen(gm: torch.fx.GraphModule) -> None:
    """Make `gm(*flat_inputs)` return a flat tuple; drop export's runtime guard call."""
    graph = gm.graph
    graph._codegen = torch.fx.graph.CodeGen()  # noqa: SLF001
    for n in list(graph.nodes):
        if n.op == "call_module" and str(n.target) == "_guards_fn":
            graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # The unlifted module checks the *structured* (args, kwargs) against the exported spec
    # in a forward pre-hook; the graph now takes the flat leaves (Captured.flat_inputs
    # checks the structure instead).
    for key, hook in list(gm._forward_pre_hooks.items()):  # noqa: SLF001
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            del gm._forward_pre_hooks[key]  # noqa: SLF001
            gm._forward_pre_hooks_with_kwargs.pop(key, None)  # noqa: SLF001
    out = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(out.args[0], (tuple, list)):
        out.args = ((out.args[0],),)
    gm.recompile()


def _propagate_fake(gm: torch.fx.GraphModule, args) -> None:
    """Fill node.meta['val'] with FakeTensors (no real compute).

    Parameters and buffers are swapped for fakes while propagating: run on the real ones,
    in-place updates such as BatchNorm's `num_batches_tracked += 1` would reach the
    user's model.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp
    from torch.nn.utils.stateless import _reparametrize_module

    mode = FakeTensorMode()
    fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    with _reparametrize_module(gm, fake_state(gm, mode, static_shapes=False), strict=False):
        FakeTensorProp(gm, mode).propagate(*fake_args)
