"""The shape symbols of a simulated step: which input dims are symbolic (batch B, sequence T,
and B2, T2, ... for later inputs of other sizes), what the plan calls them, and which dims the
step fixed to their example value (memfit.cost_models.memory.analyze_step uses these)."""

from __future__ import annotations

from typing import Any

import sympy
import torch

from memfit.ir.fx_utils import module_path


def fake_inputs(fm, flat, symbolic, DimDynamic, Ctx):
    """Fake inputs with symbolic batch (dim 0) and sequence (dim 1 of integer 2-D) sizes.

    B and T are the first such input's. The same dim of a later input (labels, a decoder's
    ids) of the same example size takes the same symbol (so `labels.view(-1)` against the
    logits' B*T rows is no guard to specialize on); of another size, its own (B2, T2, ...: a
    decoder length other than the encoder's)."""
    symbols: dict[str, int] = {}
    sym_exprs: dict[str, Any] = {}
    by_role: dict[tuple[int, int], Any] = {}     # (dim, example size) -> SymInt
    out = []
    for t in flat:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        dyn = [DimDynamic.STATIC] * t.dim()
        if symbolic and t.dim() >= 1 and t.shape[0] >= 2:
            dyn[0] = DimDynamic.DYNAMIC
        if symbolic and t.dim() == 2 and not t.is_floating_point() and t.shape[1] >= 2:
            dyn[1] = DimDynamic.DYNAMIC
        shared = {d: by_role[(d, int(t.shape[d]))] for d in range(t.dim())
                  if dyn[d] == DimDynamic.DYNAMIC and (d, int(t.shape[d])) in by_role}
        if shared and t.is_contiguous() and not t.requires_grad:
            with fm:
                f = torch.empty([shared.get(d, int(n)) for d, n in enumerate(t.shape)], dtype=t.dtype, device=t.device)
            for d in range(t.dim()):
                if d not in shared:
                    dyn[d] = DimDynamic.STATIC      # a fresh symbol would need a source of its own
        elif any(d == DimDynamic.DYNAMIC for d in dyn):
            ctx = Ctx(dynamic_sizes=dyn, constraint_sizes=[None] * t.dim())
            f = fm.from_tensor(t, symbolic_context=ctx)
            shared = {}
        else:
            f = fm.from_tensor(t, static_shapes=True)
        for dim, base in ((0, "B"), (1, "T")):
            if dim < len(dyn) and dyn[dim] == DimDynamic.DYNAMIC and dim not in shared:
                k, name = 1, base
                while name in sym_exprs:
                    k += 1
                    name = f"{base}{k}"
                sym_exprs[name], symbols[name] = f.shape[dim].node.expr, int(t.shape[dim])
                by_role[(dim, int(t.shape[dim]))] = f.shape[dim]
        out.append(f)
    return out, symbols, sym_exprs


def settle_symbols(symbols: dict, sym_exprs: dict, shape_env, specialized: dict) -> list[str]:
    """After the simulated step: drop the names (B2, T2, ...) whose symbol a guard merged
    into an earlier one, and say which dims the step fixed to their example value (an
    operator's guard specialized them; `specialized`: symbol -> (operator, node), from the
    tracker), for which the plan's expressions do not hold. Returns the notes; `symbols` and
    `sym_exprs` are updated in place."""
    notes, seen = [], {}
    for name in list(sym_exprs):
        e = shape_env.simplify(sym_exprs[name])
        if isinstance(e, sympy.Symbol) and e in seen and name not in ("B", "T"):
            del sym_exprs[name], symbols[name]
            continue
        if e.is_number:
            what = {"B": "the batch size", "T": "the sequence length"}.get(name[0], name)
            func, node = specialized.get(sym_exprs[name], (None, None))
            by = ""
            if func is not None:
                path = module_path(node) if node is not None else ""
                by = f" by {func.name()} in " + (f"module {path!r}" if path else f"node {node.name}" if node else "the loss")
            notes.append(f"{what} {name}={symbols[name]} was fixed while simulating the step{by} (its value "
                         f"decides a size there); this plan holds for {name}={symbols[name]} only")
            del sym_exprs[name], symbols[name]
            continue
        seen.setdefault(e, name)
    return notes


def rename(expr, sym_exprs: dict[str, Any], shape_env):
    """Replace shape-env symbols (s0, s1, ...) with B and T."""
    mapping = {}
    for name, e in sym_exprs.items():
        e2 = shape_env.simplify(e)
        if isinstance(e2, sympy.Symbol):
            mapping[e2] = sympy.Symbol(name)
    return expr.xreplace(mapping) if mapping else expr
