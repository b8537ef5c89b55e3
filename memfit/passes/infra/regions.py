"""Module regions: which compute nodes of a captured graph belong to which module.

`module_regions(gm, pattern)` groups the compute nodes by the outermost module whose dotted
path matches `pattern`; it reads `call_module` targets and `nn_module_stack` metadata, so it
works on both `symbolic_trace` and `torch.export` graphs. The outliner that moves such a
region into a child graph is memfit.ir.outline.outline_region (re-exported here for pass
authors, docs/custom-passes.md).
"""

from __future__ import annotations

import fnmatch
import re
from collections import OrderedDict

import torch
import torch.fx

from memfit.errors import PassError
from memfit.ir.fx_utils import COMPUTE_OPS as _COMPUTE_OPS
from memfit.ir.fx_utils import REGION_META, module_path
from memfit.ir.outline import borrowed_modules, convexity_violation, outline_region, region_inputs_outputs

__all__ = ["module_regions", "group_by_pattern", "outline_region", "region_inputs_outputs", "module_path",
           "borrowed_modules", "convexity_violation", "REGION_META"]


def _matcher(pattern):
    if isinstance(pattern, re.Pattern):
        return lambda s: pattern.fullmatch(s) is not None
    if not isinstance(pattern, str):
        raise PassError(f"module pattern must be a str (fnmatch) or re.Pattern, got {type(pattern).__name__}")
    if pattern.startswith("re:"):
        rx = re.compile(pattern[3:])
        return lambda s: rx.fullmatch(s) is not None
    return lambda s: fnmatch.fnmatchcase(s, pattern)


def module_regions(gm: torch.fx.GraphModule, pattern) -> dict[str, list[torch.fx.Node]]:
    """Group compute nodes by the outermost module whose path matches `pattern`.

    `pattern`: an fnmatch pattern on dotted module paths ("blocks.*", "encoder.layer.?"),
    a compiled regular expression, or a string "re:<regex>"; both must match the whole path.
    For each node the prefixes of its module path are tried shortest first, so with
    "blocks.*" a node of "blocks.0.attn.qkv" belongs to region "blocks.0".

    Returns {module path: nodes in graph order}, regions in graph order. Placeholders,
    get_attr and output nodes never belong to a region.
    """
    nodes = [n for n in gm.graph.nodes if n.op in _COMPUTE_OPS]
    return dict(group_by_pattern(nodes, pattern, module_path))


def group_by_pattern(nodes, pattern, path_of) -> "OrderedDict[str, list[torch.fx.Node]]":
    """{outermost matching prefix of path_of(node): nodes in the given order}; nodes whose
    path is empty or has no matching prefix are left out."""
    match = _matcher(pattern)
    regions: "OrderedDict[str, list[torch.fx.Node]]" = OrderedDict()
    cache: dict[str, str | None] = {}
    for node in nodes:
        path = path_of(node)
        if not path:
            continue
        if path not in cache:
            parts = path.split(".")
            cache[path] = next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                                if match(".".join(parts[:i]))), None)
        key = cache[path]
        if key is not None:
            regions.setdefault(key, []).append(node)
    return regions
