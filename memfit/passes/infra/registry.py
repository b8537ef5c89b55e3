"""The pass registry: names to pass classes, loaded lazily.

Built-in passes are listed as "module:Class" strings and imported on first use, so
`import memfit` pulls in neither Triton nor transformers. Third-party packages add passes
through the entry-point group `memfit.passes` (name = "package.module:PassClass").
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import is_dataclass
from importlib.metadata import entry_points

from memfit.errors import PassError
from memfit.passes.infra.base import EXACT, Pass, Promise, function_pass

ENTRY_POINT_GROUP = "memfit.passes"

# name -> "module:attr"; each module registers its pass on import as well.
_BUILTIN: dict[str, str] = {}
_BUILTIN.update({
    "outline": "memfit.passes.outline:Outline",
    "checkpoint": "memfit.passes.checkpoint:Checkpoint",
    "fuse-conv-bn": "memfit.passes.fuse_conv_bn:FuseConvBN",
    "chunked-ce": "memfit.passes.chunked_ce:ChunkedCE",
    "sparse-embedding-grad": "memfit.passes.sparse_embedding_grad:SparseEmbeddingGrad",
    "sdpa-attention": "memfit.passes.sdpa_attention:SDPAAttention",
    "quantize-activations": "memfit.passes.quantize:QuantizeActivations",
    "offload-activations": "memfit.passes.offload:OffloadActivations",
    "reversible": "memfit.passes.reversible:Reversible",
    "token-merge": "memfit.rewrites.token_merge:TokenMerge",
})

_REGISTRY: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register_pass(obj=None, *, name: str | None = None, promise: Promise = EXACT, replace: bool = False):
    """Register a Pass subclass or a function `fn(gm, ctx)` (as a pass without options).

    Usable bare (`@register_pass`) or with arguments (`@register_pass(name="x")`).
    Returns the class (for a function, the generated Pass class).
    """

    def deco(o):
        if isinstance(o, type) and issubclass(o, Pass):
            cls = o
            if name:
                cls.name = name
            if not is_dataclass(cls):
                raise PassError(f"pass class {cls.__name__} must be a frozen dataclass")
        elif callable(o):
            cls = function_pass(o, name or o.__name__.replace("_", "-"), promise)
        else:
            raise PassError(f"cannot register {o!r} as a pass")
        if not cls.name:
            raise PassError(f"pass class {cls.__name__} has no `name`")
        existing = _REGISTRY.get(cls.name)
        if existing is not None and existing is not cls and not replace and _origin(existing) != _origin(cls):
            raise PassError(f"a pass named {cls.name!r} is already registered ({existing.__module__})")
        _REGISTRY[cls.name] = cls
        return cls

    return deco(obj) if obj is not None else deco


def _origin(cls) -> tuple:
    """Where a pass class was defined; the same file imported twice (under two module names,
    e.g. by `memfit opt FILE.py` and by a test) re-registers instead of clashing."""
    where = None
    fn = getattr(cls, "_memfit_fn", None)  # function passes: the wrapped function
    for v in ([fn] if fn is not None else []) + list(vars(cls).values()):
        # a method's code knows its file even if its module is not in sys.modules
        code = getattr(v, "__code__", None)
        if code is not None and not code.co_filename.startswith("<"):
            where = os.path.realpath(code.co_filename)
            break
    if where is None:
        where = getattr(sys.modules.get(cls.__module__), "__file__", None) or cls.__module__
    return where, cls.__qualname__


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _BUILTIN and ep.name not in _REGISTRY:
            _BUILTIN[ep.name] = ep.value


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name` (importing its module if needed)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    _load_entry_points()
    target = _BUILTIN.get(name)
    if target is None:
        known = ", ".join(sorted(set(_REGISTRY) | set(_BUILTIN))) or "none"
        raise PassError(f"unknown pass {name!r} (registered: {known})")
    module, _, attr = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise PassError(f"pass {name!r} could not be loaded from {module}: {e}") from e
    cls = _REGISTRY.get(name) or getattr(mod, attr)
    _REGISTRY.setdefault(name, cls)
    return cls


def list_passes() -> list[type[Pass]]:
    """Every known pass, built-in, entry-point and user-registered, sorted by name."""
    _load_entry_points()
    out = []
    for n in sorted(set(_REGISTRY) | set(_BUILTIN)):
        try:
            out.append(get_pass(n))
        except PassError:
            continue
    return out


_ITEM = re.compile(r"\s*([A-Za-z_][\w\-.]*)\s*(?:\{([^{}]*)\})?\s*")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse `a,b{x=1,y=foo},c` into pass instances."""
    passes: list[Pass] = []
    pos = 0
    text = text.strip()
    if not text:
        return passes
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise PassError(f"malformed pipeline at column {pos + 1}: {text[pos:]!r} "
                            "(expected name or name{opt=value,...})")
        name, opts_text = m.group(1), m.group(2)
        options: dict[str, str] = {}
        if opts_text:
            for item in opts_text.split(","):
                if not item.strip():
                    continue
                k, eq, v = item.partition("=")
                if not eq or not k.strip():
                    raise PassError(f"malformed option {item.strip()!r} of pass {name!r} (expected key=value)")
                options[k.strip()] = v.strip()
        passes.append(get_pass(name).from_options(options))
        pos = m.end()
        if pos < len(text):
            if text[pos] != ",":
                raise PassError(f"malformed pipeline at column {pos + 1}: expected ',' before {text[pos:]!r}")
            pos += 1
    return passes


def format_pipeline(passes) -> str:
    return ",".join(p.to_text() for p in passes)


def as_passes(spec) -> list[Pass]:
    """A pipeline from text, a Pass instance or class, or a list mixing them."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return parse_pipeline(spec)
    if isinstance(spec, Pass):
        return [spec]
    if isinstance(spec, type) and issubclass(spec, Pass):
        return [spec()]
    out: list[Pass] = []
    for item in spec:
        out.extend(as_passes(item))
    return out
