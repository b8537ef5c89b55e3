"""`outline`: move the nodes of every module matching a pattern into a child graph module.

Exact (the same operations run in the same order). Useful on its own for reading a graph
(`memfit opt ... --passes "outline{pattern=blocks.*}"` prints one line per block) and as the
first half of region-level rewrites such as checkpointing (see docs/custom-passes.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memfit.errors import PassError
from memfit.passes.infra.base import Diagnostic, Pass, PassResult
from memfit.passes.infra.regions import module_regions, outline_region
from memfit.passes.infra.registry import register_pass


@register_pass
@dataclass(frozen=True)
class Outline(Pass):
    """Outline every module whose path matches `pattern` into a child graph module."""

    name: ClassVar[str] = "outline"
    pattern: str = "*"
    min_nodes: int = 2

    def __post_init__(self):
        if self.min_nodes < 1:
            raise ValueError(f"min_nodes must be at least 1, got {self.min_nodes}")

    def run(self, gm, ctx):
        diags, done = [], 0
        for path, nodes in module_regions(gm, self.pattern).items():
            if len(nodes) < self.min_nodes:
                diags.append(Diagnostic(self.name, f"module {path} has {len(nodes)} node(s) "
                                        f"< min_nodes={self.min_nodes}; left inline", node=nodes[0].name))
                continue
            try:
                outline_region(gm, nodes, path)
            except PassError as e:
                # not convex (its values flow out and back in): leave it, say why
                diags.append(Diagnostic(self.name, f"module {path} left inline: {e}", node=nodes[0].name,
                                        level="warning"))
                continue
            done += 1
        if not done and not diags:
            diags.append(Diagnostic(self.name, f"no module path matches {self.pattern!r}", level="warning"))
        return PassResult(gm, modified=done > 0, stats={"outlined": done}, diagnostics=diags)
