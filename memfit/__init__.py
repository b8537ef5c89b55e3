"""memfit: train PyTorch models inside a memory budget.

Imports are lazy so that `import memfit` stays cheap (no Triton, no transformers).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "optimize": "memfit.api:optimize",
    "optimize_": "memfit.api:optimize_",
    "plan": "memfit.api:plan",
    "OptimizedModule": "memfit.module:OptimizedModule",
    "Pass": "memfit.passes.base:Pass",
    "PassResult": "memfit.passes.base:PassResult",
    "PassContext": "memfit.passes.base:PassContext",
    "PassManager": "memfit.passes.manager:PassManager",
    "register_pass": "memfit.passes.registry:register_pass",
    "measure": "memfit.measure:measure",
    "Measurement": "memfit.measure:Measurement",
    "Budget": "memfit.budget:Budget",
    "MemoryPlan": "memfit.memory_plan:MemoryPlan",
    "capture": "memfit.capture:capture",
    "Captured": "memfit.capture:Captured",
    "MemfitError": "memfit.errors:MemfitError",
    "CaptureError": "memfit.errors:CaptureError",
    "BudgetError": "memfit.errors:BudgetError",
    "PassError": "memfit.errors:PassError",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):  # noqa: D103 - the lazy half of the public API
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'memfit' has no attribute {name!r}")
    module, attr = target.split(":")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


# `measure` and `capture` are both functions and submodules. Importing a submodule sets the
# package attribute to the module (`import memfit.measure` anywhere would turn
# `memfit.measure(...)` into "module is not callable"), so these two are bound eagerly,
# after their submodules are loaded: later imports find the modules in sys.modules and
# leave the attributes alone.
from memfit.capture import capture  # noqa: E402
from memfit.measure import measure  # noqa: E402
