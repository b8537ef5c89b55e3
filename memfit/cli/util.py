"""Helpers shared by the CLI commands: loading model factories, input specs, progress."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
import sys
import types
import time
from contextlib import contextmanager

import torch

from memfit.errors import MemfitError


class UsageError(MemfitError):
    """Bad command-line input: reported as one line, exit code 2."""


_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "bool": torch.bool}
_INPUT_RE = re.compile(r"^\s*([a-z0-9]+)\s*\[\s*([0-9,\s]*)\]\s*$")


def parse_input_spec(spec: str) -> torch.Tensor:
    """'float32[8,3,224,224]' -> a tensor of that dtype and shape (random / zeros)."""
    m = _INPUT_RE.match(spec)
    if not m or m.group(1) not in _DTYPES:
        raise UsageError(f"malformed --input {spec!r}: expected DTYPE[d0,d1,...] with DTYPE one of "
                         f"{', '.join(sorted(_DTYPES))}, e.g. float32[8,3,224,224]")
    shape = [int(x) for x in m.group(2).split(",") if x.strip()]
    dtype = _DTYPES[m.group(1)]
    nbytes = math.prod(shape) * dtype.itemsize
    total = _total_memory()
    if total and nbytes > total // 2:
        raise UsageError(f"--input {spec!r} takes {nbytes:,} bytes, more than half of this machine's memory: "
                         "give a smaller shape (-D batch_size=...), or build the model and its inputs under "
                         "torch.device('meta') in the factory to plan without memory")
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def parse_kv(items) -> dict:
    """['batch_size=4', 'name=x'] -> {'batch_size': 4, 'name': 'x'} (ints/floats/bools parsed)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise UsageError(f"malformed -D {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        for conv in (int, float):
            try:
                out[k] = conv(v)
                break
            except ValueError:
                continue
        else:
            out[k] = {"true": True, "false": False}.get(v.lower(), v)
    return out


def import_file(path: str, what: str = "") -> types.ModuleType:
    """Import the Python file `path` as a module (registered in sys.modules under a name
    derived from its absolute path, so a second call returns the same module). Errors are
    UsageErrors: "{what}no such file: {path}" or "{what}importing {path} failed: ...";
    a module that failed to import is not left in sys.modules."""
    name = "_memfit_user_" + re.sub(r"\W", "_", os.path.abspath(path))
    if name in sys.modules:
        return sys.modules[name]
    if not os.path.isfile(path):
        raise UsageError(f"{what}no such file: {path}")
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UsageError(f"{what}importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def load_factory(spec: str, inputs: list[str] | None = None, factory_kwargs: dict | None = None,
                 *, allow_module: bool = False):
    """Load 'path/file.py:factory' (with `allow_module`, also 'package.module:factory') and call it.

    The factory returns a model, or (model, example_inputs), or (model, example_inputs,
    example_kwargs). `inputs` ('float32[8,3,224,224]' specs) replace the example inputs.
    Returns (model, example_inputs: tuple, example_kwargs: dict).
    """
    if ":" not in spec:
        raise UsageError(f"malformed model spec {spec!r}: expected FILE.py:FACTORY, e.g. examples/gpt2_like.py:make")
    path, _, name = spec.rpartition(":")
    if path.endswith(".py") or os.sep in path:
        module = import_file(path)
    elif not allow_module:
        raise UsageError(f"{path!r} is not a .py file: memfit loads factories from files (FILE.py:FACTORY); "
                         "to call a factory of an installed module, pass --module")
    else:
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise UsageError(f"cannot import module {path!r}: {e}") from e
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{path} has no callable {name!r}")
    call = f"{name}({', '.join(f'{k}={v!r}' for k, v in (factory_kwargs or {}).items())})"
    try:
        result = factory(**(factory_kwargs or {}))
    except SystemExit as e:       # a factory that exits ends memfit's run, said in one line
        raise UsageError(f"calling {call} exited (status {e.code})") from e
    except Exception as e:  # noqa: BLE001 - any failure of user code is reported in one line
        raise UsageError(f"calling {call} failed: {type(e).__name__}: {e}") from e
    if isinstance(result, torch.nn.Module):
        model, args, kwargs = result, (), {}
    elif isinstance(result, tuple) and len(result) in (2, 3) and isinstance(result[0], torch.nn.Module):
        model, args = result[0], result[1]
        kwargs = result[2] if len(result) == 3 else {}
        if isinstance(args, torch.Tensor):
            args = (args,)
    else:
        raise UsageError(f"{name}() must return a model or (model, example_inputs[, example_kwargs]); "
                         f"got {type(result).__name__}")
    if inputs:
        args = tuple(parse_input_spec(s) for s in inputs)
    if not args and not kwargs:
        raise UsageError(f"{name}() gave no example inputs; pass --input DTYPE[shape]")
    return model, tuple(args), dict(kwargs)


def factory_loss_fn(spec: str):
    """The `loss_fn(output) -> scalar` defined beside a factory (module level), or None.
    Called after load_factory(spec), which has imported the module."""
    path = spec.rpartition(":")[0]
    if path.endswith(".py") or os.sep in path:
        module = sys.modules.get("_memfit_user_" + re.sub(r"\W", "_", os.path.abspath(path)))
    else:
        module = sys.modules.get(path)
    fn = getattr(module, "loss_fn", None) if module is not None else None
    return fn if callable(fn) else None


class Progress:
    """Stage lines on stderr: 'memfit: capturing ... 1.6 s'. Quiet when `enabled` is False."""

    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr

    @contextmanager
    def stage(self, what: str):
        t0 = time.perf_counter()
        if self.enabled:
            self.stream.write(f"memfit: {what} ...")
            self.stream.flush()
        try:
            yield
        except BaseException:
            if self.enabled:
                self.stream.write(" failed\n")
            raise
        if self.enabled:
            self.stream.write(f" {time.perf_counter() - t0:.1f} s\n")
            self.stream.flush()


def add_model_args(p) -> None:
    """The arguments every model command takes: the factory, inputs, factory options, optimizer."""
    p.add_argument("model", help="FILE.py:FACTORY (the factory returns model, example_inputs)")
    p.add_argument("--input", action="append", metavar="DTYPE[SHAPE]",
                   help="example input, e.g. float32[8,3,224,224]; repeat for several")
    p.add_argument("-D", dest="factory_args", action="append", metavar="KEY=VALUE",
                   help="keyword argument for the factory, e.g. -D batch_size=4")
    p.add_argument("--optimizer", default="adamw",
                   help="sgd, sgd-momentum, adam, adamw or none (default adamw)")
    p.add_argument("--module", action="store_true",
                   help="MODEL names PACKAGE.MODULE:FACTORY of an installed module instead of a file")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def optimizer_arg(name: str):
    """--optimizer NAME as memfit takes it: None for 'none'."""
    return None if name.lower() == "none" else name
