"""PassManager: runs a pipeline of passes over a GraphModule.

After each pass the graph is linted and recompiled; a failure is re-raised as PassError
naming the pass and the passes that ran before it.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch.fx

from memfit.errors import PassError
from memfit.passes.base import Pass, PassContext, PassResult
from memfit.passes.registry import as_passes

log = logging.getLogger(__name__)


class PassManager:
    """Order and run passes.

    `after_pass(pass_, result)` is called after each pass (used by `--print-after-all`).
    """

    def __init__(self, passes, *, verify: bool = False,
                 after_pass: Callable[[Pass, PassResult], None] | None = None):
        self.passes = as_passes(passes)
        self.verify = verify
        self.after_pass = after_pass

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx if ctx is not None else PassContext()
        total = PassResult(gm, modified=False)
        for p in self.passes:
            before = ", ".join(ctx.history) or "none"
            try:
                res = p.run(total.gm, ctx)
                if not isinstance(res, PassResult):
                    raise PassError(f"returned {type(res).__name__}, not a PassResult")
                res.gm.graph.lint()
                res.gm.recompile()
            except PassError as e:
                raise PassError(f"pass {p.to_text()!r} failed (passes run before: {before}): {e}") from e
            except Exception as e:
                raise PassError(f"pass {p.to_text()!r} failed (passes run before: {before}): "
                                f"{type(e).__name__}: {e}") from e
            ctx.history.append(p.to_text())
            total.gm = res.gm
            total.modified |= res.modified
            for k, v in res.stats.items():
                key = f"{p.name}.{k}"
                total.stats[key] = total.stats.get(key, 0) + v
            total.diagnostics.extend(res.diagnostics)
            for d in res.diagnostics:
                (log.warning if d.level != "info" else log.info)("%s", d)
            if self.after_pass is not None:
                self.after_pass(p, res)
        return total
