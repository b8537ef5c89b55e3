"""The torch.compile backend: `torch.compile(model, backend="memfit", options={"budget": ...})`.

The stages live in this folder: options.py (BackendOptions), structural.py (memfit's exact
passes on Dynamo's graph, through the PassManager), partitioner.py (MemfitPartitioner: the
budget on the joint graph), quantized_saves.py (saved tensors crossing to backward as codes),
report.py (what was decided). `memfit.backend` re-exports the public names.

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

What the budget means and how it is met: memfit/compile/partitioner.py. With no budget the
default partition is used as is.

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

import dataclasses
import logging
from typing import Callable

import torch.fx as fx

from memfit.compile.options import BACKEND_NAME, DEFAULT_PASSES, BackendError, BackendOptions  # noqa: F401
from memfit.compile.partitioner import MemfitPartitioner, _inductor_partitioner, measure_partition, pin_rng_ops  # noqa: F401
from memfit.compile.report import (_REPORTS, _REPORTS_LOCK, BackendReport, PartitionReport, clear_reports,  # noqa: F401
                                   last_report, reports)
from memfit.compile.structural import run_structural_passes

log = logging.getLogger(__name__)


def _compile(gm: fx.GraphModule, example_inputs, options: BackendOptions, mode: str | None):
    report = BackendReport(options)
    with _REPORTS_LOCK:
        _REPORTS.append(report)
    gm = run_structural_passes(gm, example_inputs, options, report)
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
