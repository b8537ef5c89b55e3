"""Quantized saved tensors in a partitioned forward/backward graph pair (torch.compile backend).

After AOTAutograd's partitioner has split the joint graph, the forward graph returns the
tensors backward needs ("saved tensors") after its user-visible outputs, and the backward
graph takes them as placeholders of the same names. Quantizing saved tensor `t` rewrites:

    forward:   ..., t, ...            -> codes, flags, scale, zero = memfit.quantize_saved(t)
               output(..., t, ...)       output(..., codes, flags, scale, zero, ...)
    backward:  placeholder t          -> placeholders t_mfq_codes, _flags, _scale, _zero
                                         t = memfit.dequantize_saved(...) before t's first use

so t itself is freed after its last forward use and backward holds the 8-bit (or 4/2-bit)
codes plus one float32 scale and zero per group of `group_size` elements. The ops are
`memfit.kernels.ops` custom operators (Triton on CUDA, the torch reference elsewhere; the
format and its error bound are in `memfit.kernels.reference`), opaque to Inductor.

A saved tensor is eligible when it is a floating-point (fp32/fp16/bf16) dense tensor of
at least `min_bytes` whose sizes backward can rebuild (ints, or sums of products of the
SymInts it takes as inputs: dynamic shapes), computed in the forward graph (not a graph input, nor a view of one),
not returned to the user as well, not sharing storage with another output, and not stashed
without a version-counter check (AOTAutograd orders those last). Everything else is kept.

Pitfalls handled (see TORCH_NOTES): every new node gets meta["val"] and
meta["tensor_meta"]; new names are derived from the saved node's (unique in the joint
graph's namespace); nodes are inserted with inserting_before(next) so chains keep their
order; the output node's per-output "desc" metadata is rebuilt to match the new outputs.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from memfit.ir.fx_utils import size_hint
from memfit.runtime.quantized_save import QuantConfig, StepScope, skip_reason, storage_key

QUANT_OUTPUTS = ("codes", "flags", "scale", "zero")
# the runtime gate's reasons (memfit.runtime.quantized_save.skip_reason), as the report says them
_REASONS = {"non_float": "dtype {dtype}", "layout": "not a dense strided tensor",
            "tiny": "smaller than {min_bytes} bytes", "parameter_buffer_or_input": "a graph input or a view of one",
            "overlapping_or_strided": "not dense (overlapping or with gaps)"}


@dataclass(frozen=True)
class SaveCandidate:
    """One saved tensor of a forward graph and what quantizing it would do."""

    name: str
    nbytes: int
    packed_nbytes: int          # codes + flags + scale + zero
    reason: str | None          # why it is not eligible; None when it is

    @property
    def saving(self) -> int:
        return self.nbytes - self.packed_nbytes if self.reason is None else 0


def _outputs(g: fx.Graph) -> tuple[fx.Node, list]:
    out = g.find_nodes(op="output")[0]
    return out, list(out.args[0])


def save_candidates(fw: fx.GraphModule, num_fwd_outputs: int, *, bw: fx.GraphModule | None = None,
                    bits: int = 8, group_size: int = 256, min_bytes: int = 4096) -> list[SaveCandidate]:
    """Every saved tensor of `fw` (the values after the first `num_fwd_outputs` outputs).

    A tensor of symbolic size is eligible only if each size is a sum of products of
    integers and symbols that `bw` takes as SymInt placeholders (the backward graph must
    rebuild the shape for dequantize from values of its own)."""
    from memfit.kernels.reference import packed_bytes

    symbols = _symbol_inputs(bw) if bw is not None else {}

    _, vals = _outputs(fw.graph)
    user_outs, saved = vals[:num_fwd_outputs], vals[num_fwd_outputs:]
    inputs = set()
    for p in fw.graph.find_nodes(op="placeholder"):
        v = p.meta.get("val")
        if isinstance(v, torch.Tensor):
            inputs.add(storage_key(v))
    users_of_storage: dict = {}
    for n in vals:
        v = n.meta.get("val") if isinstance(n, fx.Node) else None
        if isinstance(v, torch.Tensor):
            users_of_storage[storage_key(v)] = users_of_storage.get(storage_key(v), 0) + 1
    user_set = {n for n in user_outs if isinstance(n, fx.Node)}
    scope = StepScope()
    scope.excluded |= inputs
    out: list[SaveCandidate] = []
    seen: set = set()
    for n in saved:
        v = n.meta.get("val") if isinstance(n, fx.Node) else None
        if not isinstance(v, torch.Tensor) or n in seen:
            continue
        seen.add(n)
        numel = size_hint(v.numel())
        nbytes = numel * v.element_size()
        packed = packed_bytes(numel, bits, group_size) if numel else nbytes
        # graph-level reasons first, then the runtime's gate (the eager path's, the same rules)
        reason = None
        if n.op == "placeholder" or storage_key(v) in inputs:
            reason = "a graph input or a view of one"
        elif n in user_set:
            reason = "also returned to the caller"
        elif users_of_storage.get(storage_key(v), 0) > 1:
            reason = "shares storage with another output"
        elif n.meta.get("saved_tensor_with_no_vc_check", False):
            reason = "saved without a version-counter check"
        elif not all(_expressible(d, symbols) for d in v.shape):
            # backward would need the size as a value of its own graph (a saved SymInt)
            reason = "symbolic size (dynamic shapes) not available in backward"
        else:
            why = skip_reason(v, QuantConfig(bits=bits, group_size=group_size, min_bytes=min_bytes), scope)
            if why is not None:
                reason = _REASONS.get(why, why).format(dtype=v.dtype, min_bytes=min_bytes)
            elif packed >= nbytes:
                reason = "would not shrink"
        out.append(SaveCandidate(n.name, nbytes, packed, reason))
    return out


def dense_order(v: torch.Tensor):
    """None for a contiguous tensor; for a dense permuted one (a transpose of a contiguous
    buffer) the dim order `perm` with v.permute(perm) contiguous; False otherwise."""
    if v.is_contiguous():
        return None
    strides = [size_hint(s) for s in v.stride()]
    sizes = [size_hint(s) for s in v.shape]
    perm = sorted(range(v.dim()), key=lambda d: (-strides[d], -sizes[d], d))
    expect = 1
    for d in reversed(perm):
        if sizes[d] != 1 and strides[d] != expect:
            return False
        expect *= sizes[d]
    return perm


def _symbol_inputs(bw: fx.GraphModule) -> dict:
    """sympy Symbol -> the backward placeholder holding it (SymInt inputs)."""
    import sympy

    out = {}
    for p in bw.graph.find_nodes(op="placeholder"):
        v = p.meta.get("val")
        if isinstance(v, torch.SymInt) and isinstance(v.node.expr, sympy.Symbol):
            out.setdefault(v.node.expr, p)
    return out


def _expressible(d, symbols: dict, expr=None) -> bool:
    """Whether size `d` (int or SymInt) is built from ints and `symbols` by + and *."""
    import sympy

    if expr is None:
        if not isinstance(d, torch.SymInt):
            return True
        expr = d.node.expr
    if isinstance(expr, sympy.Integer):
        return True
    if isinstance(expr, sympy.Symbol):
        return expr in symbols
    if isinstance(expr, (sympy.Mul, sympy.Add)):
        return all(_expressible(None, symbols, a) for a in expr.args)
    return False


def _size_node(graph: fx.Graph, expr, symbols: dict):
    """An int, or an fx node computing sympy `expr` from the SymInt placeholders `symbols`
    (operator.mul / operator.add nodes, inserted at the graph's current insert point, each
    with its SymInt meta value)."""
    import sympy

    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        return symbols[expr]
    op = operator.mul if isinstance(expr, sympy.Mul) else operator.add
    parts = [_size_node(graph, a, symbols) for a in expr.args]
    acc = parts[0]
    for p in parts[1:]:
        node = graph.call_function(op, (acc, p))
        vals = [x.meta["val"] if isinstance(x, fx.Node) else x for x in (acc, p)]
        node.meta["val"] = op(*vals)
        acc = node
    return acc


def quantize_time_s(candidates: list[SaveCandidate], names, bytes_per_s: float, factor: float = 1.0) -> float:
    """Predicted seconds of quantizing the saved tensors `names` (memfit.planning.quantize.
    quant_time_s, the eager path's pricing)."""
    from memfit.planning.quantize import quant_time_s

    chosen = set(names)
    return sum(quant_time_s(c.nbytes, c.packed_nbytes, bytes_per_s=bytes_per_s, factor=factor)
               for c in candidates if c.name in chosen)


def choose(candidates: list[SaveCandidate], excess: int | None) -> list[str]:
    """Names to quantize: the shortest prefix of the eligible ones ranked as on the eager path
    (memfit.planning.quantize.choose_prefix: most bytes saved first) whose savings cover
    `excess` bytes (all eligible ones when `excess` is None)."""
    from memfit.planning.quantize import choose_prefix

    return choose_prefix([(c.name, c.saving, float(c.nbytes + c.packed_nbytes)) for c in candidates
                          if c.reason is None], excess)


def _set_meta(node: fx.Node, val) -> None:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    node.meta["val"] = val
    if isinstance(val, FakeTensor):
        node.meta["tensor_meta"] = _extract_tensor_metadata(val)


def _fake_mode(fw: fx.GraphModule):
    from torch._subclasses.fake_tensor import FakeTensor
    for n in fw.graph.nodes:
        if isinstance(n.meta.get("val"), FakeTensor):
            return n.meta["val"].fake_mode
    return None


def quantize_saves(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, names: list[str], *,
                   bits: int = 8, group_size: int = 256) -> int:
    """Rewrite `fw` and `bw` in place so the saved tensors `names` cross as quantized codes.
    Returns the number rewritten. Both graphs are linted and recompiled."""
    import memfit.kernels.ops  # noqa: F401  registers torch.ops.memfit.*

    if not names:
        return 0
    qop = torch.ops.memfit.quantize_saved.default
    dqop = torch.ops.memfit.dequantize_saved.default
    mode = _fake_mode(fw)
    out, vals = _outputs(fw.graph)
    by_name = {n.name: n for n in vals[num_fwd_outputs:] if isinstance(n, fx.Node)}
    bw_ph = {p.name: p for p in bw.graph.find_nodes(op="placeholder")}
    symbols = _symbol_inputs(bw)
    taken = {n.name for n in fw.graph.nodes} | set(bw_ph)
    new_vals = list(vals)
    done = 0
    for name in names:
        n = by_name.get(name)
        p = bw_ph.get(name)
        if n is None or p is None:
            raise ValueError(f"{name!r} is not a saved tensor of this forward/backward pair")
        if not p.users:   # backward never reads it (the partitioner would not save it)
            continue
        v = n.meta["val"]
        part_names = [f"{name}_mfq_{k}" for k in QUANT_OUTPUTS]
        clash = [s for s in part_names if s in taken]
        if clash:
            raise ValueError(f"node names {clash} already exist")
        taken.update(part_names)
        # forward: quantize right after the last forward use of n (so n can be freed there)
        fw_users = [u for u in n.users if u.op != "output"]
        order = {m: i for i, m in enumerate(fw.graph.nodes)}
        anchor = max(fw_users, key=order.__getitem__) if fw_users else n
        perm = dense_order(v)
        src, src_val = n, v
        if perm is not None:   # quantize the buffer's own (contiguous) order
            with mode if mode is not None else contextlib.nullcontext():
                src_val = v.permute(perm)
            with fw.graph.inserting_before(anchor.next):
                src = fw.graph.call_function(torch.ops.aten.permute.default, (n, perm))
            src.name = f"{name}_mfperm"
            _set_meta(src, src_val)
            anchor = src
        with mode if mode is not None else contextlib.nullcontext():
            fake_parts = qop(src_val, bits, group_size)
        with fw.graph.inserting_before(anchor.next):
            q = fw.graph.call_function(qop, (src, bits, group_size))
        q.name = f"{name}_mfq"
        _set_meta(q, fake_parts)
        parts = []
        after = q
        for i, (pname, fv) in enumerate(zip(part_names, fake_parts)):
            with fw.graph.inserting_before(after.next):
                g = fw.graph.call_function(operator.getitem, (q, i))
            g.name = pname
            _set_meta(g, fv)
            parts.append(g)
            after = g
        idx = new_vals.index(n, num_fwd_outputs)
        new_vals[idx:idx + 1] = parts
        # backward: four placeholders where p was, dequantize before p's first use
        new_ph = []
        for pname, fv in zip(part_names, fake_parts):
            with bw.graph.inserting_before(p):
                ph = bw.graph.placeholder(pname)
            _set_meta(ph, fv)
            for k in ("desc",):
                if k in p.meta:
                    ph.meta[k] = p.meta[k]
            new_ph.append(ph)
        border = {m: i for i, m in enumerate(bw.graph.nodes)}
        first = min(p.users, key=border.__getitem__)
        shape = list(src_val.shape)
        with bw.graph.inserting_before(first):
            shape_args = [d if not isinstance(d, torch.SymInt) else _size_node(bw.graph, d.node.expr, symbols)
                          for d in shape]
            dq = bw.graph.call_function(dqop, (*new_ph, shape_args, v.dtype, bits, group_size))
        dq.name = f"{name}_mfdq"
        with mode if mode is not None else contextlib.nullcontext():
            dq_val = dqop(*fake_parts, shape, v.dtype, bits, group_size)
        _set_meta(dq, dq_val)
        if perm is not None:   # back to the saved tensor's strides (a view)
            inv = [perm.index(d) for d in range(len(perm))]
            with bw.graph.inserting_before(first):
                back = bw.graph.call_function(torch.ops.aten.permute.default, (dq, inv))
            back.name = f"{name}_mfunperm"
            with mode if mode is not None else contextlib.nullcontext():
                _set_meta(back, dq_val.permute(inv))
            dq = back
        p.replace_all_uses_with(dq)
        bw.graph.erase_node(p)
        done += 1
    out.args = (tuple(new_vals),)
    _fix_output_meta(out, vals, new_vals, num_fwd_outputs)
    for g in (fw, bw):
        g.graph.lint()
        g.recompile()
    return done


def _fix_output_meta(out: fx.Node, old: list, new: list, num_fwd_outputs: int) -> None:
    """Per-output lists on the output node ("desc", "output_stack_traces") must stay in step
    with the outputs: saved-for-backward descs are renumbered by their new position; the
    parts of a quantized tensor get the plain saved-for-backward desc."""
    descs = out.meta.get("desc")
    if isinstance(descs, (list, tuple)) and len(descs) == len(old):
        from torch._functorch._aot_autograd.descriptors import SavedForBackwardsAOTOutput

        desc_of = {id(n): d for n, d in zip(old, descs)}
        fixed = list(descs[:num_fwd_outputs])
        for i, n in enumerate(new[num_fwd_outputs:]):
            d = desc_of.get(id(n))
            if d is None:
                fixed.append(SavedForBackwardsAOTOutput(i))
            elif hasattr(d, "idx"):
                fixed.append(type(d)(i))
            else:
                fixed.append(d)
        out.meta["desc"] = fixed
    traces = out.meta.get("output_stack_traces")
    if isinstance(traces, list) and len(traces) == len(old):
        out.meta["output_stack_traces"] = [
            n.meta.get("stack_trace") if isinstance(n, fx.Node) else None for n in new]
