"""The torch.compile backend: `torch.compile(model, backend="memfit", options={"budget": ...})`.

Three stages per graph Dynamo hands over:

1. structural passes on Dynamo's forward graph, by name through the pass registry
   (default "fuse-conv-bn" and "sdpa-attention"); a pass that is not registered, or that
   does not apply to Dynamo's torch-level graph, is skipped with a log line and recorded in
   the report, never half-applied (each runs on a copy of the graph);
2. AOTAutograd traces the joint forward+backward graph and calls memfit's partition function
   (`MemfitPartitioner`), which decides which saved values are recomputed in backward and
   which cross to backward as 8-bit (or 4/2-bit) codes, so the saved-activation bytes fit
   the budget (see "What the budget means" below);
3. code generation: Inductor (`compile_fx` with `config_patches={"custom_partitioner_fn": ...}`,
   C++ on CPU, Triton on GPU), or `codegen="eager"`: the forward and backward graphs run as
   plain fx code (what `aot_eager` does), which compiles in a second and suits tests.

What the budget means. A backend sees one graph at a time, not the whole training step, so
the budget bounds the bytes one compiled graph saves for backward ("saved bytes"): the
tensors its forward graph returns to the backward beyond the user-visible outputs,
de-duplicated by storage, not counting graph inputs (parameters, the batch) or views of
them, which are alive anyway. "50%" means half of the saved bytes of torch.compile's default
partition (min-cut with `activation_memory_budget=1`); bytes ("6GiB", 800_000_000) bound the
saved bytes of each graph directly. With no budget the default partition is used as is.

How the budget is met. Upstream's `activation_memory_budget` is a ratio of a normalized
range, not bytes, and the saved bytes it gives are not monotonic in it. memfit searches
that ratio (a linear first guess, then bisection, stopping within `tolerance` of the
target), partitions a copy of the joint graph for each trial, measures the saved bytes of
the result itself and keeps the feasible partition that saves the most (so recomputes the
least). RNG ops (dropout) are marked
`CheckpointPolicy.MUST_SAVE` first: upstream's budgeted knapsack may otherwise recompute
`native_dropout` in backward with a fresh mask on CPU (no philox functionalization there),
which gives wrong gradients; and budget 0 bypasses all marks, so the search never goes
to 0.

Quantized saves (`quantize`, lossy: gradients within the 8-bit promise, cosine >= 0.99).
"auto" (the default, as in memfit.optimize) uses them only when recompute alone cannot meet
the budget (pinned RNG outputs are a floor recompute cannot go under); "prefer" uses them
before recomputing: the search then looks for the partition with the least recompute whose
saved bytes, with every eligible tensor quantized, fit; "never" is recompute only. On the
chosen partition the largest eligible saved tensors are quantized until the budget is met,
and no more (memfit.compile.quantized_saves: custom operators `memfit::quantize_saved` /
`memfit::dequantize_saved`, Triton on CUDA, which Inductor calls as extern kernels).

Passing options. torch.compile forwards `options` to a named non-Inductor backend as the
keyword `options=` (only when non-empty) and `mode=` (when not "default"); see
`torch._TorchCompileWrapper`. Both spellings work:

    torch.compile(model, backend="memfit", options={"budget": "50%"})
    torch.compile(model, backend=memfit.compile.make_backend(budget="50%"))

What each compiled graph's partitioner decided is in `last_report()` / `reports()`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import operator
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from memfit.budget import Budget, format_bytes
from memfit.errors import BudgetError, MemfitError, PassError
from memfit.compile.quantized_saves import size_hint as _hint
from memfit.runtime.quantized_save import storage_key as _storage_key

log = logging.getLogger(__name__)

BACKEND_NAME = "memfit"
DEFAULT_PASSES = ("fuse-conv-bn", "sdpa-attention")
_CODEGENS = ("inductor", "eager")
_ON_INFEASIBLE = ("warn", "error")
_QUANTIZE = ("auto", "never", "prefer", "cheapest")


class BackendError(MemfitError):
    """Bad options for the memfit torch.compile backend."""


# ---------------------------------------------------------------------------------------
# options


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


# ---------------------------------------------------------------------------------------
# reports


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


# ---------------------------------------------------------------------------------------
# measuring a partition


def _tensor_bytes(t: torch.Tensor) -> int:
    return _hint(t.numel()) * t.element_size()


def _saved_nodes(fw: fx.GraphModule, num_fwd_outputs: int) -> list[fx.Node]:
    out = fw.graph.find_nodes(op="output")[0]
    vals = out.args[0]
    return [n for n in vals[num_fwd_outputs:] if isinstance(n, fx.Node)]


def measure_partition(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> dict:
    """Saved bytes of a forward/backward pair: tensors the forward returns for backward,
    de-duplicated by storage; those sharing storage with a forward input count as inputs.
    Recomputed ops: call_function nodes present in both graphs (names survive extraction)."""
    input_storages = set()
    for p in fw.graph.find_nodes(op="placeholder"):
        v = p.meta.get("val")
        if isinstance(v, torch.Tensor):
            input_storages.add(_storage_key(v))
    seen: set = set()
    act = inp = count = 0
    for n in _saved_nodes(fw, num_fwd_outputs):
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        count += 1
        key = _storage_key(v)
        if key in seen:
            continue
        seen.add(key)
        if key in input_storages or n.op == "placeholder":
            inp += _tensor_bytes(v)
        else:
            act += _tensor_bytes(v)
    fw_ops = {n.name for n in fw.graph.nodes if n.op == "call_function"}
    bw_ops = {n.name for n in bw.graph.nodes if n.op == "call_function"}
    return {"saved_bytes": act, "saved_input_bytes": inp, "saved_count": count,
            "recomputed_nodes": len(fw_ops & bw_ops)}


# ---------------------------------------------------------------------------------------
# the partitioner


def _is_rng(node: fx.Node) -> bool:
    """An op that draws random numbers (dropout, rand_like, bernoulli, inductor_seeds).
    Inductor's `inductor_random(seed, ...)` is not one: it is a pure function of a seed
    drawn by `inductor_seeds`, so pinning the seed makes its recompute replay."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in target.tags)


def pin_rng_ops(gm: fx.GraphModule) -> int:
    """Mark RNG ops (and the getitems of multi-output ones) MUST_SAVE. Returns the count."""
    from torch.utils.checkpoint import CheckpointPolicy

    count = 0
    for n in gm.graph.nodes:
        if _is_rng(n):
            n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            count += 1
            for u in n.users:
                if u.target is operator.getitem:
                    u.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    return count


def _copy_gm(gm: fx.GraphModule) -> fx.GraphModule:
    # Graph.__deepcopy__ copies nodes with a shallow copy of node.meta, so FakeTensor
    # values are shared, not cloned; the partitioners mutate the graph, not the values.
    with warnings.catch_warnings():  # pytree's LeafSpec deprecation, raised by deepcopy
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    return fx.GraphModule(gm, graph)


def _has_backward(gm: fx.GraphModule) -> bool:
    return any("tangents" in p.name for p in gm.graph.find_nodes(op="placeholder"))


class MemfitPartitioner:
    """A partition function for AOTAutograd (`partition_fn`) that meets a byte budget.

    Calls upstream's `min_cut_rematerialization_partition` on copies of the joint graph with
    trial values of `activation_memory_budget`, measures each result's saved bytes and keeps
    the feasible one saving the most. Appends a PartitionReport to `self.report.partitions`.
    """

    def __init__(self, options: BackendOptions, report: BackendReport | None = None):
        self.options = options
        self.report = report if report is not None else BackendReport(options)

    def _partition(self, joint: fx.GraphModule, joint_inputs, ratio: float, **kw):
        from torch._functorch import config as fconfig
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        g = _copy_gm(joint)
        with fconfig.patch(activation_memory_budget=ratio):
            fw, bw = min_cut_rematerialization_partition(g, joint_inputs, **kw)
        return fw, bw, measure_partition(fw, bw, kw["num_fwd_outputs"])

    def __call__(self, joint: fx.GraphModule, joint_inputs: Sequence[Any], *, num_fwd_outputs: int,
                 **kwargs) -> tuple[fx.GraphModule, fx.GraphModule]:
        kwargs.setdefault("compiler", "inductor")
        kw = dict(kwargs, num_fwd_outputs=num_fwd_outputs)
        if not _has_backward(joint):
            # subgraphs (HOP bodies) come without tangents: nothing to plan.
            from torch._functorch.partitioners import min_cut_rematerialization_partition
            return min_cut_rematerialization_partition(joint, joint_inputs, **kw)
        opts = self.options
        pinned = pin_rng_ops(joint) if opts.pin_rng else 0
        results: dict[float, tuple] = {}
        trials: list[tuple[float, int]] = []

        def trial(r: float) -> tuple:
            if r not in results:
                fw, bw, m = self._partition(joint, joint_inputs, r, **kw)
                results[r] = (r, fw, bw, m)
                trials.append((r, m["saved_bytes"]))
            return results[r]

        base = trial(1.0)[3]
        target = None if opts.budget is None else opts.budget.resolve(base["saved_bytes"])
        best, quant = results[1.0], False
        timing = _Timing(joint, results[1.0], num_fwd_outputs, self._qargs())
        alternatives: dict[str, float] = {}
        if target is not None and base["saved_bytes"] > target:
            plain = self._cost_fn(num_fwd_outputs, quantized=False)
            qcost = self._cost_fn(num_fwd_outputs, quantized=True)

            def recompute_plan():
                return self._search(trial, target, base["saved_bytes"], plain)

            def quantize_plan():   # the least recompute at which quantizing can fit
                default = results[1.0]
                return default if qcost(default) <= target else self._search(
                    trial, target, base["saved_bytes"], qcost)

            mode = opts.quantize
            if mode == "never":
                best = recompute_plan()
            elif mode == "auto":       # exact first (DESIGN.md: lossy only when needed)
                best = recompute_plan()
                if plain(best) > target:
                    best, quant = quantize_plan(), True
            elif mode == "prefer":
                best, quant = quantize_plan(), True
            else:                      # "cheapest": price both plans
                r_plan, q_plan = recompute_plan(), quantize_plan()
                alternatives = {"recompute": timing.extra_s(r_plan, target, quantized=False),
                                "quantize": timing.extra_s(q_plan, target, quantized=True)}
                r_fits, q_fits = plain(r_plan) <= target, qcost(q_plan) <= target
                if (q_fits and (not r_fits or alternatives["quantize"] < alternatives["recompute"])
                        or not r_fits and qcost(q_plan) < plain(r_plan)):   # neither fits: the smaller
                    best, quant = q_plan, True
                else:
                    best = r_plan
        predicted_extra = timing.extra_s(best, target, quantized=quant) if target is not None else 0.0
        ratio, fw, bw, m = best
        picked, skipped, cands = [], {}, []
        if quant:
            from memfit.compile.quantized_saves import choose, quantize_saves, save_candidates

            cands = save_candidates(fw, num_fwd_outputs, bw=bw, **self._qargs())
            picked = choose(cands, max(0, m["saved_bytes"] - target))
            quantize_saves(fw, bw, num_fwd_outputs, picked, bits=opts.quantize_bits,
                           group_size=opts.quantize_group_size)
            m = measure_partition(fw, bw, num_fwd_outputs)
            for c in cands:
                if c.reason is not None:
                    skipped[c.reason] = skipped.get(c.reason, 0) + 1
        fits = target is None or m["saved_bytes"] <= target
        chosen = {c.name: c for c in cands if c.name in picked}
        rep = PartitionReport(
            baseline_saved_bytes=base["saved_bytes"], saved_bytes=m["saved_bytes"], target_bytes=target,
            saved_input_bytes=m["saved_input_bytes"], baseline_saved_count=base["saved_count"],
            saved_count=m["saved_count"], recomputed_nodes=m["recomputed_nodes"],
            baseline_recomputed_nodes=base["recomputed_nodes"], ratio=None if ratio == 1.0 else ratio,
            fits=fits, rng_pinned=pinned, trials=trials, quantized=list(picked),
            quantized_bytes=sum(c.nbytes for c in chosen.values()),
            quantized_packed_bytes=sum(c.packed_nbytes for c in chosen.values()),
            quantize_bits=opts.quantize_bits if picked else None, quantize_skipped=skipped,
            predicted_extra_s=predicted_extra, alternatives_s=alternatives)
        self.report.partitions.append(rep)
        log.info("memfit partition: %s", rep)
        if not fits:
            how = "by recompute alone" if opts.quantize == "never" else (
                f"by recompute and {opts.quantize_bits}-bit saved tensors")
            msg = (f"memfit: the saved bytes of this graph cannot be brought under the budget "
                   f"{opts.budget} ({format_bytes(target)}) {how}: the least found is "
                   f"{format_bytes(m['saved_bytes'])} (default partition {format_bytes(base['saved_bytes'])}); "
                   f"raise the budget")
            if opts.on_infeasible == "error":
                raise BudgetError(msg)
            log.warning("%s", msg)
        return fw, bw

    def _qargs(self) -> dict:
        o = self.options
        return {"bits": o.quantize_bits, "group_size": o.quantize_group_size, "min_bytes": o.quantize_min_bytes}

    def _cost_fn(self, num_fwd_outputs: int, quantized: bool) -> Callable[[tuple], int]:
        """Saved bytes of a trial partition: as partitioned, or the least reachable by
        quantizing every eligible saved tensor of it."""
        if not quantized:
            return lambda entry: entry[3]["saved_bytes"]
        from memfit.compile.quantized_saves import save_candidates

        memo: dict[float, int] = {}

        def cost(entry):
            r, fw, bw, m = entry
            if r not in memo:
                cands = save_candidates(fw, num_fwd_outputs, bw=bw, **self._qargs())
                memo[r] = m["saved_bytes"] - sum(c.saving for c in cands)
            return memo[r]
        return cost

    def _search(self, trial: Callable[[float], tuple], target: int, base: int,
                cost: Callable[[tuple], int]) -> tuple:
        """The feasible partition (cost <= target) with the highest cost, i.e. the least
        recompute, over trial ratios in (0, 1]; `trial` caches partitions by ratio.

        Starts from the linear guess target/base, then bisects; stops once a feasible
        partition reaches (1 - tolerance) of the target. Returns the lowest-cost
        partition tried when none is feasible.
        """
        # Budget 0 returns "save the inputs only" and ignores MUST_SAVE marks (it would
        # recompute dropout), so the lowest trial is a small positive ratio.
        lo_ratio = 1e-4
        tried: dict[float, tuple] = {}

        def run(r):
            tried[r] = trial(r)
            return cost(tried[r])

        run(1.0)
        lo, hi = lo_ratio, 1.0
        r = min(max(target / base, lo_ratio), 1.0)
        last_feasible = None
        for _ in range(max(1, self.options.search_steps)):
            c = run(r)
            if c <= target:
                lo = r
                # Close enough, or raising the ratio bought nothing (the curve has steps).
                if c >= (1.0 - self.options.tolerance) * target or c == last_feasible:
                    break
                last_feasible = c
            else:
                hi = r
            r = (lo + hi) / 2
        feasible = [x for x in tried.values() if cost(x) <= target]
        if not feasible:
            run(lo_ratio)
            feasible = [x for x in tried.values() if cost(x) <= target]
        if feasible:
            return max(feasible, key=lambda x: (cost(x), -x[3]["recomputed_nodes"]))
        return min(tried.values(), key=cost)


class _Timing:
    """Predicted extra time of a partition over the default one (roofline on the device's
    nominal rates, memfit.cost_models.memory.DeviceSpec): recomputed forward ops beyond the
    default partition's, plus quantize/dequantize traffic of the tensors that would be chosen
    (scaled by the kernels' traffic factor: the CPU reference is about 30x one pass)."""

    def __init__(self, joint: fx.GraphModule, base_entry: tuple, num_fwd_outputs: int, qargs: dict):
        from memfit.cost_models.memory import DeviceSpec
        from memfit.kernels.dispatch import traffic_factor

        vals = (n.meta.get("val") for n in joint.graph.find_nodes(op="placeholder"))
        dev = next((v.device for v in vals if isinstance(v, torch.Tensor)), torch.device("cpu"))
        self.spec = DeviceSpec.for_device(dev)
        self.qfactor = traffic_factor(dev)
        self.num_fwd_outputs, self.qargs = num_fwd_outputs, qargs
        self.base = self._recompute(base_entry)

    def _recompute(self, entry) -> float:
        from memfit.compile.quantized_saves import recompute_time_s
        return recompute_time_s(entry[1], entry[2], self.spec.flops_per_s, self.spec.bytes_per_s)

    def extra_s(self, entry, target: int | None, quantized: bool) -> float:
        t = max(0.0, self._recompute(entry) - self.base)
        if quantized and target is not None:
            from memfit.compile.quantized_saves import choose, quantize_time_s, save_candidates
            cands = save_candidates(entry[1], self.num_fwd_outputs, bw=entry[2], **self.qargs)
            names = choose(cands, max(0, entry[3]["saved_bytes"] - target))
            t += quantize_time_s(cands, names, self.spec.bytes_per_s, self.qfactor)
        return t


def _inductor_partitioner(options: BackendOptions, report: BackendReport):
    """A CustomPartitionerFn (what Inductor's config takes) wrapping MemfitPartitioner."""
    from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files

    global _InductorPartitioner
    if _InductorPartitioner is None:
        class InductorPartitioner(CustomPartitionerFn):
            def __init__(self, options: BackendOptions, report: BackendReport | None = None):
                self.inner = MemfitPartitioner(options, report)

            def __call__(self, gm, joint_inputs, **kwargs):
                return self.inner(gm, joint_inputs, **kwargs)

            def uuid(self):
                # The cache key: this file's source and the options.
                h = hashlib.sha256(get_hash_for_files((__file__,)))
                h.update(repr(sorted(self.inner.options.to_dict().items())).encode())
                return h.hexdigest()

            # Inductor pickles its config into cache keys; the report is run state.
            def __getstate__(self):
                return {"options": self.inner.options}

            def __setstate__(self, state):
                self.inner = MemfitPartitioner(state["options"])

        InductorPartitioner.__module__ = __name__
        InductorPartitioner.__qualname__ = "_InductorPartitioner"
        _InductorPartitioner = InductorPartitioner
    return _InductorPartitioner(options, report)


# Defined on first use so that importing this module does not import Inductor.
_InductorPartitioner = None


# ---------------------------------------------------------------------------------------
# structural passes on Dynamo's graph


def _inputs_fake_mode(example_inputs):
    from torch._subclasses.fake_tensor import FakeTensor

    return next((t.fake_mode for t in example_inputs if isinstance(t, FakeTensor)), None)


def _graph_fake_mode(gm: fx.GraphModule):
    from torch._subclasses.fake_tensor import FakeTensor

    for n in gm.graph.nodes:
        v = n.meta.get("val", n.meta.get("example_value"))
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def _expose_example_values(gm: fx.GraphModule, example_inputs) -> None:
    """memfit passes read shapes from node.meta["val"] (the export convention). Where
    Dynamo's example inputs are fake, propagate them through this copy; otherwise (the
    usual case: real inputs) use Dynamo's node.meta["example_value"].
    (node.meta is this copy's own dict: Dynamo's graph is left alone.)"""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    try:
        mode = _inputs_fake_mode(example_inputs)
        if mode is not None:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*example_inputs)
            return
    except Exception as e:  # shape propagation is a convenience for the passes
        log.info("memfit backend: fake propagation on Dynamo's graph failed (%s); "
                 "using Dynamo's example values", e)
    for n in gm.graph.nodes:
        if "val" not in n.meta and "example_value" in n.meta:
            n.meta["val"] = n.meta["example_value"]


def _run_structural_passes(gm: fx.GraphModule, example_inputs, options: BackendOptions,
                           report: BackendReport) -> fx.GraphModule:
    if not options.passes:
        return gm
    from torch._guards import TracingContext, tracing

    from memfit.passes.infra.base import PassContext, PassResult
    from memfit.passes.infra.registry import get_pass, parse_pipeline

    ctx = PassContext(budget=options.budget, config={"frontend": "dynamo", "example_inputs": example_inputs})
    for spec in options.passes:
        name = spec.split("{", 1)[0].strip()
        try:
            get_pass(name)
            (p,) = parse_pipeline(spec)
        except PassError as e:
            log.info("memfit backend: pass %r skipped: %s", name, e)
            report.passes_skipped.append((name, f"not available: {e}"))
            continue
        if p.promise.kind != "exact":
            report.passes_skipped.append((name, f"promise {p.promise.kind!r}: the backend runs exact passes only"))
            log.info("memfit backend: pass %r skipped: not exact", name)
            continue
        work = _copy_gm(gm)
        _expose_example_values(work, example_inputs)
        try:
            # Passes find the fake mode with detect_fake_mode, which prefers the tracing
            # context's; make that the mode of the values on this graph.
            mode = _inputs_fake_mode(example_inputs) or _graph_fake_mode(work)
            with (tracing(TracingContext(mode)) if mode is not None else contextlib.nullcontext()):
                res = p.run(work, ctx)
            if not isinstance(res, PassResult):
                raise PassError(f"returned {type(res).__name__}, not a PassResult")
            res.gm.graph.lint()
            res.gm.recompile()
        except Exception as e:  # a pass written for export graphs may not fit Dynamo's
            log.warning("memfit backend: pass %r failed on Dynamo's graph and was skipped: %s: %s",
                        name, type(e).__name__, e)
            report.passes_skipped.append((name, f"failed: {type(e).__name__}: {e}"))
            continue
        gm = res.gm
        ctx.history.append(p.to_text())
        report.passes_run.append(p.to_text())
        report.diagnostics.extend(res.diagnostics)
        for d in res.diagnostics:
            (log.warning if d.level != "info" else log.info)("%s", d)
        for k, v in res.stats.items():
            report.pass_stats[f"{p.name}.{k}"] = report.pass_stats.get(f"{p.name}.{k}", 0) + v
    return gm


# ---------------------------------------------------------------------------------------
# the backend


def _compile(gm: fx.GraphModule, example_inputs, options: BackendOptions, mode: str | None):
    report = BackendReport(options)
    with _REPORTS_LOCK:
        _REPORTS.append(report)
    gm = _run_structural_passes(gm, example_inputs, options, report)
    from torch._functorch import config as fconfig

    # A cache hit would skip the partitioner and leave the report empty.
    with fconfig.patch(enable_autograd_cache=False):
        if options.codegen == "eager":
            from torch._dynamo.backends.common import aot_autograd
            from torch._dynamo.backends.debugging import boxed_nop
            from torch._inductor.decomposition import select_decomp_table

            # Inductor's decompositions, so the partitioner sees the ops it sees under Inductor.
            return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop,
                                decompositions=select_decomp_table(),
                                partition_fn=MemfitPartitioner(options, report),
                                keep_inference_input_mutations=True)(gm, example_inputs)
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(mode)) if mode and mode != "default" else {}
        patches.update(dict(options.inductor_config))
        patches["custom_partitioner_fn"] = _inductor_partitioner(options, report)
        return compile_fx(gm, example_inputs, config_patches=patches)


def memfit_backend(gm: fx.GraphModule, example_inputs, *, options: dict | None = None,
                   mode: str | None = None):
    """The backend torch.compile calls: `torch.compile(m, backend="memfit", options={...})`.

    `options` keys are the fields of BackendOptions (budget, passes, codegen, pin_rng,
    search_steps, on_infeasible, inductor_config); `mode` is Inductor's mode.
    """
    opts = BackendOptions.from_dict(options)
    return _compile(gm, example_inputs, opts, mode)


def make_backend(budget=None, **options) -> Callable:
    """A backend callable with options bound: `torch.compile(m, backend=make_backend("50%"))`.

    Options are validated now, not at the first call."""
    opts = BackendOptions.from_dict(dict(options, budget=budget))

    def backend(gm, example_inputs, *, mode: str | None = None, options: dict | None = None):
        o = opts if not options else BackendOptions.from_dict({**_to_fields(opts), **options})
        return _compile(gm, example_inputs, o, mode)

    backend.options = opts
    backend.__name__ = "memfit"
    return backend


def _to_fields(o: BackendOptions) -> dict:
    return {f.name: getattr(o, f.name) for f in dataclasses.fields(o)}


def register(name: str = BACKEND_NAME) -> None:
    """Make `backend="memfit"` resolve even where the package's entry point is not
    installed (a source checkout on sys.path). Idempotent."""
    from torch._dynamo.backends import registry

    registry._lazy_import()  # discovers entry points
    if name in registry._COMPILER_FNS:
        return
    ep = registry._BACKENDS.get(name)
    if ep is not None:
        try:
            registry.lookup_backend(name)
            return
        except Exception as e:  # a stale entry point (package moved); fall back
            log.info("memfit backend entry point %r failed to load (%s); registering directly", ep, e)
            registry._BACKENDS.pop(name, None)
    registry.register_backend(memfit_backend, name=name)
