"""What the backend decided: one BackendReport per backend call (one Dynamo graph), one
PartitionReport per joint graph partitioned. `last_report()` / `reports()` read them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from memfit.budget import format_bytes
from memfit.compile.options import BackendOptions

@dataclass
class PartitionReport:
    """What the partitioner decided for one joint graph. Bytes are saved-for-backward bytes
    as defined in the module docstring (graph inputs excluded)."""

    baseline_saved_bytes: int          # torch.compile's default min-cut partition
    saved_bytes: int                   # the partition memfit returned
    target_bytes: int | None           # the budget resolved to bytes, None without budget
    saved_input_bytes: int             # graph inputs (or views of them) saved as well
    baseline_saved_count: int
    saved_count: int
    recomputed_nodes: int              # forward ops that run again in backward
    baseline_recomputed_nodes: int
    ratio: float | None                # upstream activation_memory_budget used, None: default
    fits: bool
    rng_pinned: int                    # RNG ops marked MUST_SAVE
    trials: list[tuple[float, int]] = field(default_factory=list)  # (ratio, saved bytes)
    quantized: list[str] = field(default_factory=list)  # saved tensors crossing as codes
    quantized_bytes: int = 0           # their bytes before quantization
    quantized_packed_bytes: int = 0    # and after (codes, flags, scales, zeros)
    quantize_bits: int | None = None
    quantize_skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (eligible: none)
    predicted_extra_s: float = 0.0     # roofline: more recompute than the default + quantize/dequantize
    alternatives_s: dict[str, float] = field(default_factory=dict)  # quantize="cheapest": both plans

    def __str__(self) -> str:
        tgt = "none" if self.target_bytes is None else format_bytes(self.target_bytes)
        q = ""
        if self.quantized:
            q = (f", quantized {len(self.quantized)} saved tensors to {self.quantize_bits} bits "
                 f"({format_bytes(self.quantized_bytes)} -> {format_bytes(self.quantized_packed_bytes)})")
        return (f"saved {format_bytes(self.baseline_saved_bytes)} -> {format_bytes(self.saved_bytes)} "
                f"(target {tgt}, {'fits' if self.fits else 'DOES NOT FIT'}), "
                f"recomputed ops {self.baseline_recomputed_nodes} -> {self.recomputed_nodes}, "
                f"ratio {self.ratio if self.ratio is not None else 'default'}, rng pinned {self.rng_pinned}{q}, "
                f"predicted extra {self.predicted_extra_s * 1e3:.3g} ms")


@dataclass
class BackendReport:
    """One call of the backend (one Dynamo graph): passes run and skipped, partitions."""

    options: BackendOptions
    passes_run: list[str] = field(default_factory=list)
    passes_skipped: list[tuple[str, str]] = field(default_factory=list)   # (name, reason)
    pass_stats: dict[str, int] = field(default_factory=dict)
    diagnostics: list = field(default_factory=list)      # memfit.passes.infra.base.Diagnostic
    partitions: list[PartitionReport] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return sum(p.saved_bytes for p in self.partitions)

    @property
    def baseline_saved_bytes(self) -> int:
        return sum(p.baseline_saved_bytes for p in self.partitions)

    @property
    def recomputed_nodes(self) -> int:
        return sum(p.recomputed_nodes for p in self.partitions)

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.partitions)

    def __str__(self) -> str:
        lines = [f"memfit backend (budget {self.options.budget}, codegen {self.options.codegen})",
                 f"  passes run: {', '.join(self.passes_run) or 'none'}"]
        for name, why in self.passes_skipped:
            lines.append(f"  pass skipped: {name}: {why}")
        for d in self.diagnostics:
            lines.append(f"  {d}")
        for i, p in enumerate(self.partitions):
            lines.append(f"  graph {i}: {p}")
        return "\n".join(lines)


_REPORTS: list[BackendReport] = []
_REPORTS_LOCK = threading.Lock()


def reports() -> list[BackendReport]:
    """Reports of every backend call since the last `clear_reports()`, oldest first."""
    with _REPORTS_LOCK:
        return list(_REPORTS)


def last_report() -> BackendReport | None:
    """The report of the latest backend call (None if the backend has not run)."""
    with _REPORTS_LOCK:
        return _REPORTS[-1] if _REPORTS else None


def clear_reports() -> None:
    with _REPORTS_LOCK:
        _REPORTS.clear()
