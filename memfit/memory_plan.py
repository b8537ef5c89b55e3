"""MemoryPlan: the immutable record of what one training step will hold, and why.

A plan carries bytes per category (parameters, buffers, inputs, gradients, optimizer state,
saved activations, transient), the predicted peak and where it falls, the budget and
whether the step fits, the peak as an expression in the batch size B (and sequence length
T), the largest batch that fits, per-module saved bytes, and the decisions passes made.
It round-trips through JSON and prints as a stable text table (FileCheck tests match it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from memfit.budget import format_bytes
from memfit.cost_models.cuda_allocator import bounded_peak

CATEGORY_ORDER = ("parameters", "buffers", "inputs", "gradients", "optimizer_state",
                  "saved_activations", "transient")


@dataclass(frozen=True)
class ModuleRow:
    """Bytes and work attributed to one module (its own nodes and its children's)."""

    path: str              # dotted module path; "" is the model itself
    saved_bytes: int       # kept for backward
    output_bytes: int      # allocated by its nodes in the forward
    flops: int             # forward FLOPs
    est_time_s: float      # forward time estimate


@dataclass(frozen=True)
class Decision:
    """One choice a pass or the planner made (keep / recompute / quantize / fuse ...)."""

    target: str            # node or module path
    action: str
    saved_bytes: int       # predicted bytes saved at the peak
    extra_time_s: float    # predicted extra step time
    detail: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    device: str
    capture_method: str
    optimizer: str | None
    peak_bytes: int
    peak_phase: str
    categories: dict          # bytes per category over the step (max live; saved: total)
    peak_breakdown: dict      # live bytes per category at the peak
    budget: str | None = None
    budget_bytes: int | None = None
    symbols: dict = field(default_factory=dict)     # {"B": 8, "T": 1024}: example values
    peak_expr: str = ""
    saved_expr: str = ""
    max_batch: int | None = None
    flops: int = 0
    modules: tuple = ()
    decisions: tuple = ()
    predicted_extra_time_s: float = 0.0
    timeline: tuple = ()      # ((phase, {category: bytes}), ...), down-sampled for plots
    notes: tuple = ()
    # CUDA: the caching allocator's simulated peaks {"allocated", "reserved", "expandable_segments"}
    # (memfit.cost_models.cuda_allocator); None elsewhere
    allocator: dict | None = None
    budget_of: str = "allocated"     # what the budget bounds on CUDA: "allocated" or "reserved"

    @property
    def device_peak_bytes(self) -> int:
        """The peak the budget bounds: on CUDA the caching allocator's simulated
        max_memory_allocated (blocks rounded to 512 bytes, and unsplit) or, with
        budget_of="reserved", max_memory_reserved; elsewhere the step's peak."""
        return bounded_peak(self.peak_bytes, self.allocator, self.budget_of)

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.device_peak_bytes <= self.budget_bytes

    # -------------------------------------------------------------- JSON round trip
    def to_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = [asdict(m) for m in self.modules]
        d["decisions"] = [asdict(x) for x in self.decisions]
        d["timeline"] = [[p, dict(c)] for p, c in self.timeline]
        d["notes"] = list(self.notes)
        d["fits"] = self.fits
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryPlan":
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["modules"] = tuple(ModuleRow(**m) for m in d.get("modules", ()))
        kw["decisions"] = tuple(Decision(**x) for x in d.get("decisions", ()))
        kw["timeline"] = tuple((p, dict(c)) for p, c in d.get("timeline", ()))
        kw["notes"] = tuple(d.get("notes", ()))
        return cls(**kw)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_json(cls, text: str) -> "MemoryPlan":
        return cls.from_dict(json.loads(text))

    # -------------------------------------------------------------- text table
    def format_table(self, depth: int = 1) -> str:
        """The plan as text: categories, peak, budget, batch expression, modules to `depth`."""
        out = [f"memfit plan: {self.model} (captured by {self.capture_method}, {self.device}, "
               f"optimizer {self.optimizer or 'none'})"]
        out.append(f"{'category':<20}{'over the step':>16}{'at peak':>16}")
        for c in CATEGORY_ORDER:
            out.append(f"{c:<20}{format_bytes(self.categories.get(c, 0)):>16}"
                       f"{format_bytes(self.peak_breakdown.get(c, 0)):>16}")
        out.append(f"{'peak':<20}{format_bytes(self.peak_bytes):>16}  in {self.peak_phase}")
        if self.allocator:
            out.append(f"{'CUDA allocator':<20}{format_bytes(self.allocator['allocated']):>16}  max_memory_allocated, "
                       f"{format_bytes(self.allocator['reserved'])} max_memory_reserved (simulated)")
        if self.budget_bytes is not None:
            of = f" ({self.budget_of})" if self.allocator else ""
            if self.fits:
                verdict = f"fits{of} ({format_bytes(self.budget_bytes - self.device_peak_bytes)} to spare)"
            else:
                verdict = f"does not fit{of} ({format_bytes(self.device_peak_bytes - self.budget_bytes)} over)"
            out.append(f"{'budget':<20}{format_bytes(self.budget_bytes):>16}  {self.budget}: {verdict}")
        if self.symbols:
            at = ", ".join(f"{k}={v}" for k, v in self.symbols.items())
            out.append(f"peak({at}) = {self.peak_expr} bytes")
            out.append(f"saved activations = {self.saved_expr} bytes")
            if self.budget_bytes is not None and "B" in self.symbols:
                mb = "none" if self.max_batch is None else str(self.max_batch)
                out.append(f"largest batch within budget: {mb}")
        if self.decisions:
            out.append("decisions:")
            for x in self.decisions:
                out.append(f"  {x.target:<40} {x.action:<12} saves {format_bytes(x.saved_bytes)}"
                           f"  +{x.extra_time_s * 1e3:.2f} ms {x.detail}".rstrip())
            out.append(f"predicted extra time: {self.predicted_extra_time_s * 1e3:.2f} ms")
        if depth > 0 and self.modules:
            out.append(f"{'module':<44}{'saved':>14}{'output':>14}{'GFLOP':>10}")
            for m in self.modules_at(depth):
                name = m.path or "(model)"
                indent = "  " * (m.path.count(".") if m.path else 0)
                out.append(f"{(indent + name)[:43]:<44}{format_bytes(m.saved_bytes):>14}"
                           f"{format_bytes(m.output_bytes):>14}{m.flops / 1e9:>10.3f}")
        for n in self.notes:
            out.append(f"note: {n}")
        return "\n".join(out)

    def modules_at(self, depth: int) -> list[ModuleRow]:
        return [m for m in self.modules if (m.path.count(".") + 1 if m.path else 0) <= depth]

    def __str__(self) -> str:
        return self.format_table()


def module_rows(node_costs) -> tuple[ModuleRow, ...]:
    """Aggregate per-node costs into every module prefix (a module counts its children)."""
    acc: dict[str, list] = {}
    order: list[str] = []
    for rec in node_costs:
        parts = rec.module.split(".") if rec.module else []
        for i in range(len(parts) + 1):
            key = ".".join(parts[:i])
            if key not in acc:
                acc[key] = [0, 0, 0, 0.0]
                order.append(key)
            a = acc[key]
            a[0] += rec.saved_bytes
            a[1] += rec.output_bytes
            a[2] += rec.flops
            a[3] += rec.est_time_s
    # Depth-first order: parents before children, siblings in first-use order.
    rank = {k: i for i, k in enumerate(order)}
    order.sort(key=lambda k: [rank[".".join(k.split(".")[:i + 1])] for i in range(len(k.split(".")))] if k else [-1])
    return tuple(ModuleRow(k, *acc[k]) for k in order)


def downsample_timeline(timeline, max_points: int = 400) -> tuple:
    """Keep at most `max_points` events, always including the peak of each stride."""
    if len(timeline) <= max_points:
        return tuple((p, c) for _, p, c in timeline)
    stride = len(timeline) / max_points
    out = []
    for i in range(max_points):
        chunk = timeline[int(i * stride):int((i + 1) * stride)] or [timeline[-1]]
        best = max(chunk, key=lambda e: sum(e[2].values()))
        out.append((best[1], best[2]))
    return tuple(out)
