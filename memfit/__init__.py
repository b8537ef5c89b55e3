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
    "with_loss": "memfit.api:with_loss",
    "OptimizedModule": "memfit.ir.module:OptimizedModule",
    "Pass": "memfit.passes.infra.base:Pass",
    "PassResult": "memfit.passes.infra.base:PassResult",
    "PassContext": "memfit.passes.infra.base:PassContext",
    "PassManager": "memfit.passes.infra.manager:PassManager",
    "register_pass": "memfit.passes.infra.registry:register_pass",
    "measure": "memfit.cost_models.measure:measure",
    "Measurement": "memfit.cost_models.measure:Measurement",
    "Budget": "memfit.budget:Budget",
    "MemoryPlan": "memfit.memory_plan:MemoryPlan",
    "capture": "memfit.ir.capture:capture",
    "Captured": "memfit.ir.capture:Captured",
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
