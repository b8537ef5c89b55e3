"""The partitioner: AOTAutograd's `partition_fn` that meets a byte budget on the joint graph.

What the budget means. A backend sees one graph at a time, not the whole training step, so
the budget bounds the bytes one compiled graph saves for backward ("saved bytes"): the
tensors its forward graph returns to the backward beyond the user-visible outputs,
de-duplicated by storage, not counting graph inputs (parameters, the batch) or views of
them, which are alive anyway. "50%" means half of the saved bytes of torch.compile's default
partition (min-cut with `activation_memory_budget=1`); bytes bound the saved bytes of each
graph directly.

How the budget is met. Upstream's `activation_memory_budget` is a ratio of a normalized
range, not bytes, and the saved bytes it gives are not monotonic in it. memfit searches that
ratio with the one budget search (memfit.planning.solvers.first_fit), partitions a copy of
the joint graph for each trial, measures the saved bytes of the result itself and keeps the
feasible partition that saves the most (so recomputes the least). RNG ops (dropout) are marked
`CheckpointPolicy.MUST_SAVE` first: upstream's budgeted knapsack may otherwise recompute
`native_dropout` in backward with a fresh mask on CPU (no philox functionalization there),
which gives wrong gradients; and budget 0 bypasses all marks, so the search never goes to 0.
Quantized saves (memfit.compile.quantized_saves) are chosen with the eager path's eligibility,
pricing and ranking (memfit.planning.quantize).
"""

from __future__ import annotations

import hashlib
import logging
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from memfit.budget import format_bytes
from memfit.compile.options import BackendOptions
from memfit.compile.report import BackendReport, PartitionReport
from memfit.errors import BudgetError
from memfit.ir.fx_utils import copy_graph_module, size_hint
from memfit.runtime.quantized_save import storage_key as _storage_key

log = logging.getLogger(__name__)

# ratio grid of the search: steps between 1 and the smallest ratio tried
_RATIO_STEPS = 1000


def _tensor_bytes(t: torch.Tensor) -> int:
    return size_hint(t.numel()) * t.element_size()


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

        g = copy_graph_module(joint)   # partitioners mutate the graph, not the values
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

        The one budget search (memfit.planning.solvers.first_fit) over a grid of ratios from 1
        down to a small positive one (the floor, evaluated first), interpolating on the ratio;
        it stops once a feasible partition reaches (1 - tolerance) of the target. Of the
        partitions tried, the feasible one with the highest cost wins (upstream's saved bytes
        are not monotone in the ratio). Returns the lowest-cost partition tried when none is
        feasible.
        """
        from memfit.planning.solvers.search import first_fit

        # Budget 0 returns "save the inputs only" and ignores MUST_SAVE marks (it would
        # recompute dropout), so the lowest trial is a small positive ratio.
        lo_ratio, steps = 1e-4, _RATIO_STEPS
        ratios = [1.0 - i * (1.0 - lo_ratio) / steps for i in range(steps + 1)]
        tried: dict[float, tuple] = {}

        def run(i):
            tried[ratios[i]] = trial(ratios[i])
            return cost(tried[ratios[i]])

        tol = self.options.tolerance
        first_fit(len(ratios), run, target, known={0: run(0)}, position=[1.0 - r for r in ratios],
                  max_evals=max(1, self.options.search_steps) + 1, good_enough=lambda c: c >= (1.0 - tol) * target)
        feasible = [x for x in tried.values() if cost(x) <= target]
        if feasible:
            return max(feasible, key=lambda x: (cost(x), -x[3]["recomputed_nodes"]))
        return min(tried.values(), key=cost)


class _Timing:
    """Predicted extra time of a partition over the default one (roofline on the device's
    nominal rates, memfit.cost_models.roofline.DeviceSpec): recomputed forward ops beyond the
    default partition's, plus quantize/dequantize traffic of the tensors that would be chosen
    (scaled by the kernels' traffic factor: the CPU reference is about 30x one pass)."""

    def __init__(self, joint: fx.GraphModule, base_entry: tuple, num_fwd_outputs: int, qargs: dict):
        from memfit.cost_models.roofline import DeviceSpec
        from memfit.kernels.dispatch import traffic_factor

        vals = (n.meta.get("val") for n in joint.graph.find_nodes(op="placeholder"))
        dev = next((v.device for v in vals if isinstance(v, torch.Tensor)), torch.device("cpu"))
        self.spec = DeviceSpec.for_device(dev)
        self.qfactor = traffic_factor(dev)
        self.num_fwd_outputs, self.qargs = num_fwd_outputs, qargs
        self.base = self._recompute(base_entry)

    def _recompute(self, entry) -> float:
        from memfit.cost_models.roofline import recompute_time_s
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
