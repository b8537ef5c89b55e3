"""The pass API: Pass, PassResult, PassContext, Diagnostic, Promise.

A pass is a frozen dataclass with a class-level `name` and typed option fields; its text form
`name{opt=val,...}` round-trips (`Pass.to_text`, `memfit.passes.infra.registry.parse_pipeline`), so
the CLI, tests and the registry share one spelling (the xDSL convention).

A pass rewrites the captured GraphModule (`memfit.ir.capture.Captured.gm`: flat placeholders,
a flat tuple output, `node.meta["val"]` FakeTensors) and returns a PassResult with the counts of
what it rewrote, a diagnostic for everything it skipped and the decisions it made.

In place or copy, the one rule (as xDSL's `apply`): `run(gm, ctx)` rewrites `gm` in place and
returns it in the PassResult (a function pass may return a new GraphModule instead; the
manager continues with whatever the result holds). Whoever needs the graph as it was (a
planner trying alternatives) runs the pass on a copy: `Pass.apply_to_clone(gm, ctx)`.

Source rewrites (`SourceRewrite`, e.g. token merging) change the nn.Module itself and run as
their own stage before capture (memfit.passes.infra.pipeline); they share the registry and the
text form with graph passes.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx

from memfit.errors import PassError


@dataclass(frozen=True)
class Promise:
    """What a pass keeps of the model's numerics.

    kind: "exact" (same outputs and gradients up to float rounding: `rtol`),
    "approximate" (gradients close: cosine similarity at least `cosine`), or
    "changes_function" (a documented change of the model; not checked numerically).
    """

    kind: str = "exact"
    rtol: float = 1e-5
    cosine: float | None = None

    def __post_init__(self):
        if self.kind not in ("exact", "approximate", "changes_function"):
            raise ValueError(f"unknown promise kind {self.kind!r}")


EXACT = Promise("exact", rtol=1e-5)


@dataclass(frozen=True)
class Diagnostic:
    """Something a pass noticed: a skipped candidate and why, or a warning."""

    pass_name: str
    message: str
    node: str | None = None
    level: str = "info"  # info | warning | error

    def __str__(self) -> str:
        where = f" at {self.node}" if self.node else ""
        return f"{self.level}: [{self.pass_name}]{where}: {self.message}"


@dataclass
class PassResult:
    """What a pass returns: the graph module (the one it was given, rewritten in place), whether
    it changed, rewrite counts (`stats`, asserted in tests), diagnostics, and the decisions it
    made (memfit.memory_plan.Decision: what it chose, predicted bytes saved and extra time),
    which memfit.optimize puts in the plan."""

    gm: torch.fx.GraphModule
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    decisions: list = field(default_factory=list)


FRONTENDS = ("export", "dynamo")


@dataclass
class PassContext:
    """Everything a pass may read besides the graph; no globals.

    captured: the memfit.ir.capture.Captured the graph came from (example inputs, specs,
        training flag); None on Dynamo's graphs.
    budget: the step's budget in bytes (or a memfit.budget.Budget), None without one.
    optimizer, loss_fn: as given to memfit.optimize (a name or an instance; loss_fn(output)).
    frontend: "export" (memfit's capture: aten training IR or symbolic_trace) or "dynamo"
        (the torch-level graph torch.compile hands the backend).
    inputs: flat example inputs when there is no `captured` (the backend's, or verify mode's
        own); `example_inputs` reads `captured` first.
    verify_seed: the RNG seed verify mode runs both graphs from (dropout draws the same masks).
    history: text forms of the passes already run (the manager appends).
    """

    captured: Any = None
    budget: Any = None
    optimizer: Any = None
    loss_fn: Any = None
    frontend: str = "export"
    inputs: list | None = None
    verify_seed: int = 0
    history: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.frontend not in FRONTENDS:
            raise ValueError(f"frontend must be one of {FRONTENDS}, got {self.frontend!r}")

    @property
    def example_inputs(self) -> list:
        """The flat example inputs (real tensors, or FakeTensors on Dynamo's graphs) the graph's
        placeholders take."""
        if self.captured is not None:
            return self.captured.flat_inputs()
        return list(self.inputs or [])


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(value: str, tp, what: str):
    """Convert one option's text to the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value.lower() == "none":
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        v = value.lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise PassError(f"{what}: expected a boolean, got {value!r}")
    if tp in (int, float, str):
        try:
            return tp(value)
        except ValueError:
            raise PassError(f"{what}: expected {tp.__name__}, got {value!r}") from None
    if origin in (tuple, list):
        inner = args[0] if args else str
        items = [s for s in value.split(":") if s != ""] if value else []
        return tuple(_convert(s, inner, what) for s in items)
    raise PassError(f"{what}: options of type {tp} cannot be given as text")


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ":".join(_format(v) for v in value)
    return str(value)


@dataclass(frozen=True)
class Pass:
    """Base class of passes. Subclasses are frozen dataclasses:

        @register_pass
        @dataclass(frozen=True)
        class MyPass(Pass):
            name: ClassVar[str] = "my-pass"
            threshold: int = 4
            def run(self, gm, ctx): ...

    Options are the dataclass fields; tuple options are written `a:b:c` in the text form.
    """

    name: ClassVar[str] = ""
    promise: ClassVar[Promise] = EXACT
    stage: ClassVar[str] = "graph"   # "source": a SourceRewrite, run before capture

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def apply_to_clone(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        """Run on a copy of `gm` (memfit.ir.fx_utils.copy_graph_module): `gm` stays as it was."""
        from memfit.ir.fx_utils import copy_graph_module

        return self.run(copy_graph_module(gm), ctx)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_text(self) -> str:
        """`name{opt=val,...}` with only the options that differ from their defaults."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if v != default:
                parts.append(f"{f.name}={_format(v)}")
        return self.name + ("{" + ",".join(parts) + "}" if parts else "")

    @classmethod
    def from_options(cls, options: dict[str, str]) -> "Pass":
        """Build from text options, converting each to its field's type."""
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for k, v in options.items():
            if k not in fields:
                known = ", ".join(fields) or "none"
                raise PassError(f"pass {cls.name!r} has no option {k!r} (options: {known})")
            kwargs[k] = _convert(v, hints[k], f"option {k!r} of pass {cls.name!r}") if isinstance(v, str) else v
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise PassError(f"pass {cls.name!r}: {e}") from None

    @classmethod
    def option_docs(cls) -> list[tuple[str, str, str]]:
        """(name, type, default) for each option, for `memfit passes`."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            plain = isinstance(tp, type) and not typing.get_args(tp)
            tname = tp.__name__ if plain else str(tp).replace("typing.", "")
            default = f.default if f.default is not dataclasses.MISSING else "(required)"
            out.append((f.name, tname, _format(default)))
        return out


def function_pass(fn, name: str, promise: Promise = EXACT) -> type[Pass]:
    """Wrap `fn(gm, ctx) -> PassResult | GraphModule | None` as a Pass class without options."""

    def run(self, gm, ctx):
        out = fn(gm, ctx)
        if isinstance(out, PassResult):
            return out
        if out is None:
            return PassResult(gm, modified=True)
        if isinstance(out, torch.fx.GraphModule):
            return PassResult(out, modified=True)
        raise PassError(f"function pass {name!r} returned {type(out).__name__}; "
                        "return a PassResult, a GraphModule or None")

    cls = type(fn.__name__, (Pass,), {"__annotations__": {}, "run": run, "__doc__": fn.__doc__,
                                     "_memfit_fn": staticmethod(fn),
                                     "__module__": fn.__module__})
    cls.name = name
    cls.promise = promise
    return dataclass(frozen=True)(cls)


@dataclass
class RewriteResult:
    """What a source rewrite returns: the new module (sharing the original's parameters),
    whether it changed, counts, diagnostics and decisions as PassResult, and `meta` for the
    captured graph's `gm.meta` (what the rewrite did, for later stages and tests)."""

    model: Any
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    decisions: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SourceRewrite(Pass):
    """A rewrite of the nn.Module itself (new forwards over the same parameters), run before
    capture: `apply(model, example_inputs, example_kwargs) -> RewriteResult`. Named and parsed
    like a pass; pipelines run every source rewrite first (memfit.passes.infra.pipeline)."""

    stage: ClassVar[str] = "source"

    def apply(self, model, example_inputs=(), example_kwargs=None) -> RewriteResult:
        raise NotImplementedError

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        raise PassError(f"{self.name} rewrites the source module before capture, not a captured graph: "
                        f"give it in a pipeline (memfit.optimize(passes=...), memfit opt --passes, "
                        f"memfit.passes.infra.pipeline.run_pipeline), or call its apply(model)")
