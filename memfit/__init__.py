"""memfit: train PyTorch models inside a memory budget.

Imports are lazy so that `import memfit` stays cheap (no Triton, no transformers).
"""

from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"

_LAZY = {
    "optimize": "memfit.api:optimize",
    "optimize_": "memfit.api:optimize_",
    "plan": "memfit.api:plan",
    "with_loss": "memfit.api:with_loss",
    "fully_shard": "memfit.ir.fsdp:fully_shard",
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


class _NoiseFilter(logging.Filter):
    """Drops the lines importing torchao (memfit[optim]) logs on a machine without its optional
    CUDA extensions (their .so files fail to load; nothing memfit uses needs them), and torch's
    deprecation line about torchao's enums."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.name == "torchao" and msg.startswith("Failed to load") and "torchao/_C" in msg:
            return False
        if "Enum subclass and is now natively supported" in msg and isinstance(record.args, tuple) and record.args:
            return not getattr(record.args[0], "__module__", "").startswith("torchao")
        return True


def quiet_import_noise() -> None:
    """Filter those lines from now on (cheap: nothing is imported). Done when memfit is
    imported, because transformers imports torchao whenever it is installed."""
    for name in ("torchao", "torch.utils._pytree"):
        lg = logging.getLogger(name)
        if not any(isinstance(x, _NoiseFilter) for x in lg.filters):
            lg.addFilter(_NoiseFilter())


quiet_import_noise()
