"""PassManager: runs a pipeline of passes over a GraphModule.

After each pass the graph is linted and recompiled; a failure is re-raised as PassError
naming the pass and the passes that ran before it. Verify mode (`verify=True`) checks
metadata and numerics after each pass: memfit.passes.infra.verify.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx

from memfit.errors import PassError
from memfit.passes.infra.base import Pass, PassContext, PassResult
from memfit.passes.infra.registry import as_passes
from memfit.passes.infra.verify import VerificationError, _Verifier  # noqa: F401 - VerificationError is public here

log = logging.getLogger(__name__)


class PassManager:
    """Order and run passes.

    `after_pass(pass_, result)` is called after each pass (used by `--print-after-all`).
    `verify`: check metadata and numerics after each pass (see the module docstring); needs
    example inputs (`ctx.captured`, or `ctx.inputs`: a list of flat inputs).
    `skip_failing`: run each pass on a copy and keep it only if it succeeds; a pass that fails
    is logged, listed in `self.skipped` as (text form, reason), and the pipeline goes on with
    the graph as it was (the torch.compile backend: a pass written for memfit's capture may not
    fit Dynamo's graph, and must never be half-applied there).
    Passes rewrite the graph module they are given in place (memfit.passes.infra.base); the
    parameters and buffers it shares with the user's model are never changed. The result's
    decisions are every pass's, in order.
    """

    def __init__(self, passes, *, verify: bool = False, skip_failing: bool = False,
                 after_pass: Callable[[Pass, PassResult], None] | None = None):
        self.passes = as_passes(passes)
        self.verify = verify
        self.skip_failing = skip_failing
        self.after_pass = after_pass
        self.skipped: list[tuple[str, str]] = []

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        total = PassResult(gm, modified=False)
        verifier = _Verifier(gm, ctx) if self.verify else None
        try:
            for p in self.passes:
                before = ", ".join(ctx.history) or "none"
                try:
                    res = p.apply_to_clone(total.gm, ctx) if self.skip_failing else p.run(total.gm, ctx)
                    if not isinstance(res, PassResult):
                        raise PassError(f"returned {type(res).__name__}, not a PassResult")
                    res.gm.graph.lint()
                    res.gm.recompile()
                except Exception as e:
                    why = str(e) if isinstance(e, PassError) else f"{type(e).__name__}: {e}"
                    if self.skip_failing:
                        log.warning("pass %r failed and was skipped: %s", p.to_text(), why)
                        self.skipped.append((p.to_text(), f"failed: {why}"))
                        continue
                    raise PassError(f"pass {p.to_text()!r} failed (passes run before: {before}): {why}") from e
                if verifier is not None:
                    verifier.check(p, res.gm, before)
                ctx.history.append(p.to_text())
                total.gm = res.gm
                total.modified |= res.modified
                for k, v in res.stats.items():
                    key = f"{p.name}.{k}"
                    total.stats[key] = total.stats.get(key, 0) + v
                total.diagnostics.extend(res.diagnostics)
                total.decisions.extend(res.decisions)
                for d in res.diagnostics:
                    (log.warning if d.level != "info" else log.info)("%s", d)
                if self.after_pass is not None:
                    self.after_pass(p, res)
        finally:
            if verifier is not None:
                verifier.close()
        return total
