"""Options of the memfit torch.compile backend: the `options=` dict of torch.compile."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from memfit.budget import Budget
from memfit.errors import MemfitError
from memfit.planning.techniques import EXACT_STRUCTURAL, TECHNIQUES

BACKEND_NAME = "memfit"
DEFAULT_PASSES = tuple(TECHNIQUES[t] for t in EXACT_STRUCTURAL)   # memfit.optimize's exact structural passes
_CODEGENS = ("inductor", "eager")
_ON_INFEASIBLE = ("warn", "error")
_QUANTIZE = ("auto", "never", "prefer", "cheapest")


class BackendError(MemfitError):
    """Bad options for the memfit torch.compile backend."""


@dataclass(frozen=True)
class BackendOptions:
    """Options of the memfit backend (the `options=` dict of torch.compile).

    budget: bytes, "6GiB", "50%" or None (no budget: torch's default partition).
    passes: structural passes run on Dynamo's graph, by registry name or text form.
    codegen: "inductor" (default) or "eager" (plain fx code, fast to compile).
    pin_rng: mark RNG ops MUST_SAVE so recompute never redraws a dropout mask.
    search_steps: most partitions tried per graph beyond the default one.
    tolerance: stop searching once a feasible partition saves (1 - tolerance) of the target.
    on_infeasible: "warn" (log, keep the smallest partition found) or "error" (BudgetError).
    inductor_config: extra Inductor config patches, as (key, value) pairs.
    quantize: saved tensors crossing to backward as quantized codes (lossy, see
        memfit.compile.quantized_saves): "auto" (default) only when recompute alone cannot meet the
        budget, "prefer" before recomputing, "cheapest" whichever of the two plans has the
        lower predicted extra time (roofline), "never".
    quantize_bits, quantize_group_size, quantize_min_bytes: the format (8/4/2 bits, one
        float32 scale and zero per group) and the smallest tensor worth quantizing.
    """

    budget: Budget | None = None
    passes: tuple[str, ...] = DEFAULT_PASSES
    codegen: str = "inductor"
    pin_rng: bool = True
    search_steps: int = 6
    tolerance: float = 0.1
    on_infeasible: str = "warn"
    inductor_config: tuple[tuple[str, Any], ...] = ()
    quantize: str = "auto"
    quantize_bits: int = 8
    quantize_group_size: int = 256
    quantize_min_bytes: int = 4096

    def __post_init__(self):
        if self.budget is not None and not isinstance(self.budget, Budget):
            object.__setattr__(self, "budget", Budget.parse(self.budget))
        if isinstance(self.passes, str):
            object.__setattr__(self, "passes", tuple(p for p in self.passes.split(",") if p.strip()))
        else:
            object.__setattr__(self, "passes", tuple(self.passes))
        if self.codegen not in _CODEGENS:
            raise BackendError(f"codegen must be one of {_CODEGENS}, got {self.codegen!r}")
        if self.on_infeasible not in _ON_INFEASIBLE:
            raise BackendError(f"on_infeasible must be one of {_ON_INFEASIBLE}, got {self.on_infeasible!r}")
        if not isinstance(self.search_steps, int) or self.search_steps < 0:
            raise BackendError(f"search_steps must be a non-negative int, got {self.search_steps!r}")
        if not (0.0 <= self.tolerance < 1.0):
            raise BackendError(f"tolerance must be in [0, 1), got {self.tolerance!r}")
        if self.quantize not in _QUANTIZE:
            raise BackendError(f"quantize must be one of {_QUANTIZE}, got {self.quantize!r}")
        from memfit.kernels.reference import check_args
        try:
            check_args(self.quantize_bits, self.quantize_group_size)
        except ValueError as e:
            raise BackendError(f"quantize_bits/quantize_group_size: {e}") from None
        if not isinstance(self.quantize_min_bytes, int) or self.quantize_min_bytes < 0:
            raise BackendError(f"quantize_min_bytes must be a non-negative int, got {self.quantize_min_bytes!r}")
        if isinstance(self.inductor_config, dict):
            object.__setattr__(self, "inductor_config", tuple(sorted(self.inductor_config.items())))

    @classmethod
    def from_dict(cls, d: dict | None) -> "BackendOptions":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise BackendError(f"unknown memfit backend option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {"budget": None if self.budget is None else str(self.budget), "passes": list(self.passes),
                "codegen": self.codegen, "pin_rng": self.pin_rng, "search_steps": self.search_steps,
                "tolerance": self.tolerance,
                "on_infeasible": self.on_infeasible, "inductor_config": dict(self.inductor_config),
                "quantize": self.quantize, "quantize_bits": self.quantize_bits,
                "quantize_group_size": self.quantize_group_size, "quantize_min_bytes": self.quantize_min_bytes}
