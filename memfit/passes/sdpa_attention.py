"""sdpa-attention: explicit attention -> torch.nn.functional.scaled_dot_product_attention.

Recognised (in export graphs' aten ops and in symbolic_trace graphs' torch/method calls):

    scores = (q [* s_q]) @ k^T [* s | / s]          k^T: a transpose of k, or any (..., E, S)
    scores = scores + mask                           additive float mask (HF eager models)
           | scores.masked_fill(cond, -inf)          cond True = masked
           | torch.where(keep, scores, -inf)         keep True = attended
    p      = softmax(scores, -1) [in fp32, cast back]
    p      = dropout(p, p_drop)                      optional
    out    = p @ v

The replacement is one `scaled_dot_product_attention(q, k, v, attn_mask, dropout_p,
is_causal, scale=s)` node, with the scale given explicitly (the product of every factor seen).
A masked_fill/where mask built from a constant lower-triangular buffer by prefix slices (the
nanoGPT `bias[:, :, :T, :T]` form) becomes `is_causal=True`; other masks are passed as
`attn_mask` (bool keep-masks for masked_fill/where, the float tensor for additive masks).

Numerics: the same function; in fp32 outputs and gradients agree to float rounding (the tests
bound the whole-model gradient norm difference by 1e-5 relative). masked_fill values of at
most -1e4 count as -inf (exp underflows to exactly 0 in fp32); rows with every position masked
differ (softmax of all -inf is NaN, SDPA's is defined).

Memory: the explicit form keeps the (B, H, T, T) scores/probabilities for backward; SDPA's
fused kernels (CPU flash attention, CUDA flash/memory-efficient) keep q, k, v, the output and a
(B, H, T) log-sum-exp: linear in T per layer. A float attn_mask is kept as well, but it is the
same storage in every layer (computed once per model).

Dropout: with p > 0 in a training graph the attention dropout draws its mask from SDPA's own
RNG stream, so outputs are equal in distribution only, not bit for bit; such candidates are
skipped with a diagnostic unless `allow_dropout=true`, which rewrites them and says so in a
warning. (On CPU, SDPA with dropout falls back to the math kernel, which saves more, not less.)
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx
import torch.nn.functional as F

from memfit.ir.fx_utils import erase_dead as _erase_dead
from memfit.ir.fx_utils import fetch_attr, is_pure
from memfit.ir.fx_utils import fake_mode_of as _fake_mode
from memfit.ir.fx_utils import run_fake as _run_fake
from memfit.passes.attention_patterns import (_FN_TO_KIND, _arg, _const_fill, _describe, _is_causal_cond,
                                              _is_scalar, _kind, _number, _same, _users, _val)
from memfit.passes.infra.base import EXACT, Diagnostic, Pass, PassContext, PassResult, Promise
from memfit.passes.infra.registry import register_pass
from memfit.runtime.attention import sdpa_with_dropout_module

aten = torch.ops.aten
prims = torch.ops.prims

# masked_fill / where fill values at or below this count as -inf (exp(-1e4) == 0 in fp32)
NEG_INF_THRESHOLD = -1e4


class _Skip(Exception):
    """A candidate that does not match; the message goes into a diagnostic."""


@dataclass
class _Match:
    softmax: torch.fx.Node
    out: torch.fx.Node                     # the final p @ v node
    q: torch.fx.Node
    k: torch.fx.Node | None                # None: insert transpose(kt)
    kt: torch.fx.Node
    v: torch.fx.Node
    scale: list = field(default_factory=list)     # [(factor, "mul"|"div")], factor float or Node
    attn_mask: object = None                      # Node, or ("not", Node) for masked_fill cond
    is_causal: bool = False
    dropout_p: float = 0.0
    dropout_module: str | None = None             # symbolic_trace graphs: nn.Dropout target
    chain: list = field(default_factory=list)     # nodes that become dead


@register_pass
@dataclass(frozen=True)
class SDPAAttention(Pass):
    """Explicit attention -> scaled_dot_product_attention (see module docstring).

    Options: allow_dropout (rewrite attention with dropout p > 0 in training graphs; equal in
    distribution only), causal (detect causal masks from lower-triangular buffers).
    Stats: `rewritten`, `causal` (of those, with is_causal=True), `masked` (with attn_mask),
    `dropout` (with dropout_p > 0), `skipped` (softmax nodes not rewritten; see diagnostics),
    `causal_mask_dropped` / `empty_mask_dropped` (constant masks folded into is_causal, or
    dropped because they mask nothing).
    """

    name: ClassVar[str] = "sdpa-attention"
    promise: ClassVar[Promise] = EXACT
    allow_dropout: bool = False
    causal: bool = True

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"rewritten": 0, "causal": 0, "masked": 0, "dropout": 0, "skipped": 0}
        diags: list[Diagnostic] = []
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False) or _kind(gm, node) != "softmax":
                continue
            try:
                m = self._match(gm, node)
            except _Skip as e:
                stats["skipped"] += 1
                diags.append(Diagnostic(self.name, str(e), node=node.name))
                continue
            if m.dropout_p > 0 or m.dropout_module is not None:
                diags.append(Diagnostic(self.name, "attention dropout rewritten (allow_dropout=true): SDPA "
                                        "draws its own dropout masks, so outputs and gradients match the "
                                        "original in distribution only, not bit for bit", node=node.name,
                                        level="warning"))
                stats["dropout"] += 1
            self._rewrite(gm, m)
            stats["rewritten"] += 1
            stats["causal"] += int(m.is_causal)
            stats["masked"] += int(m.attn_mask is not None)
        dropped = [_drop_constant_causal_mask(gm, n) for n in list(gm.graph.nodes)
                   if n.op == "call_function" and n.target in _SDPA_FUNCS]
        stats["causal_mask_dropped"] = dropped.count("causal")
        stats["empty_mask_dropped"] = dropped.count("empty")
        changed = stats["rewritten"] + stats["causal_mask_dropped"] + stats["empty_mask_dropped"] > 0
        if changed:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified=changed, stats=stats, diagnostics=diags)

    # ------------------------------------------------------------------ matching

    def _match(self, gm, sm: torch.fx.Node) -> _Match:
        x = sm.args[0] if sm.args else sm.kwargs.get("input")
        if sm.op == "call_module":
            dim = gm.get_submodule(sm.target).dim
        else:
            dim = _arg(sm, 1, "dim")
        xv = _val(x)
        if xv is None or not isinstance(dim, int) or dim not in (-1, xv.dim() - 1):
            raise _Skip("softmax is not over the last dimension of a tensor with known shape")
        chain = [sm]

        # forward: casts, optional dropout, casts, then p @ v
        cur, dropout_p, dropout_module = sm, 0.0, None
        while True:
            users = _users(cur)
            if len(users) != 1:
                raise _Skip(f"{cur.name} has {len(users)} users (attention probabilities used elsewhere, "
                            "e.g. output_attentions), so they stay in memory anyway")
            u = users[0]
            k = _kind(gm, u)
            if k == "cast":
                chain.append(u)
                cur = u
                continue
            if k == "dropout":
                if dropout_p or dropout_module:
                    raise _Skip("two dropouts on the attention probabilities")
                if u.op == "call_module":
                    mod = gm.get_submodule(u.target)
                    if mod.p > 0:
                        if not self.allow_dropout:
                            raise _Skip(f"attention dropout p={mod.p} (nn.Dropout {u.target}) may be active: "
                                        "SDPA's dropout masks differ from the graph's, so the rewrite "
                                        "matches in distribution only; pass allow_dropout=true to accept")
                        dropout_module = u.target
                else:
                    p = _arg(u, 1, "p", 0.5)
                    if isinstance(p, torch.fx.Node):  # Dynamo with dynamic=True: floats are inputs too
                        p = _val(p)
                        if not isinstance(p, (int, float)):
                            raise _Skip("attention dropout probability is symbolic (torch.compile "
                                        "dynamic=True traces Python floats as inputs), so whether "
                                        "dropout is active cannot be told")
                    p = float(p)
                    train = _arg(u, 2, "train", _arg(u, 2, "training", True))
                    if train and p > 0:
                        if not self.allow_dropout:
                            raise _Skip(f"attention dropout p={p} in a training graph: SDPA's dropout masks "
                                        "differ from the graph's, so the rewrite matches in distribution only; "
                                        "pass allow_dropout=true to accept")
                        dropout_p = p
                chain.append(u)
                cur = u
                continue
            if k == "matmul" and u.args[0] is cur:
                out, v = u, u.args[1]
                break
            raise _Skip(f"attention probabilities feed {_describe(u)}, not a matmul with the values")

        # backward from the softmax input: casts, mask, casts, scales, casts, q @ k^T
        scale: list = []
        mask, is_causal = None, False
        cur = x
        while True:
            if len(_users(cur)) != 1:
                raise _Skip(f"{cur.name} (attention scores) has other users")
            k = _kind(gm, cur)
            if k == "cast":
                chain.append(cur)
                cur = cur.args[0]
                continue
            if k in ("mul", "div"):
                a, b = cur.args[0], cur.args[1] if len(cur.args) > 1 else cur.kwargs.get("other")
                if k == "mul" and _is_scalar(a) and not _is_scalar(b):
                    a, b = b, a
                if not _is_scalar(b):
                    raise _Skip(f"scores scaled by a tensor ({_describe(b)}), not a number")
                scale.append((b, k))
                chain.append(cur)
                cur = a
                continue
            if k in ("add", "masked_fill", "where") and mask is None and not scale:
                chain.append(cur)
                cur, mask, is_causal = self._peel_mask(gm, cur, k)
                continue
            if k == "matmul":
                q, kt = cur.args[0], cur.args[1]
                chain.append(cur)
                break
            raise _Skip(f"softmax input comes from {_describe(cur)}, not from q @ k^T")

        # pre-scaled q or k (q * s, k * s, k^T * s)
        while _kind(gm, q) == "mul" and _is_scalar(q.args[1]):
            scale.append((q.args[1], "mul"))
            q = q.args[0]
        while _kind(gm, kt) == "mul" and _is_scalar(kt.args[1]):
            scale.append((kt.args[1], "mul"))
            kt = kt.args[0]
        key = None
        ktv = _val(kt)
        if ktv is not None and _kind(gm, kt) == "transpose":
            d0, d1 = (int(d) % ktv.dim() for d in (_arg(kt, 1, "dim0"), _arg(kt, 2, "dim1")))
            if {d0, d1} == {ktv.dim() - 2, ktv.dim() - 1}:
                key = kt.args[0]
                while _kind(gm, key) == "mul" and _is_scalar(key.args[1]):
                    scale.append((key.args[1], "mul"))
                    key = key.args[0]

        qv, vv, ov = _val(q), _val(v), _val(out)
        kv_ = _val(key) if key is not None else None
        if qv is None or ktv is None or vv is None or ov is None:
            raise _Skip("q, k or v has no shape metadata")
        if not (qv.dim() == ktv.dim() == vv.dim() >= 3):
            raise _Skip(f"q, k^T, v ranks {qv.dim()}, {ktv.dim()}, {vv.dim()}: SDPA needs equal ranks >= 3")
        for i in range(qv.dim() - 2):
            if not (_same(qv.shape[i], ktv.shape[i]) and _same(qv.shape[i], vv.shape[i])):
                raise _Skip("q, k and v batch/head dimensions differ (broadcasting attention is not rewritten)")
        if not (qv.dtype == ktv.dtype == vv.dtype == ov.dtype) or not qv.is_floating_point():
            raise _Skip(f"dtypes differ (q {qv.dtype}, k {ktv.dtype}, v {vv.dtype}, out {ov.dtype})")
        if kv_ is not None and kv_.dtype != qv.dtype:
            key = None
        if isinstance(mask, torch.fx.Node) and _val(mask) is not None:
            mv = _val(mask)
            if mv.dtype != torch.bool and mv.dtype != qv.dtype:
                raise _Skip(f"additive mask dtype {mv.dtype} differs from the query's {qv.dtype}")
        return _Match(softmax=sm, out=out, q=q, k=key, kt=kt, v=v, scale=scale, attn_mask=mask,
                      is_causal=is_causal, dropout_p=dropout_p, dropout_module=dropout_module, chain=chain)

    def _peel_mask(self, gm, n, kind):
        """(scores node, attn_mask, is_causal) for an add / masked_fill / where node."""
        nv = _val(n)
        if kind == "add":
            a, b = n.args[0], n.args[1]
            if len(n.args) > 2 or n.kwargs.get("alpha", 1) != 1:
                raise _Skip("add with alpha")
            # the scores are the operand with the full shape of the result
            cands = [(s, m) for s, m in ((a, b), (b, a)) if isinstance(s, torch.fx.Node) and isinstance(m, torch.fx.Node)
                     and _val(s) is not None and _val(m) is not None and tuple(_val(s).shape) == tuple(nv.shape)
                     and _kind(gm, s) in ("mul", "div", "matmul", "cast")]
            if not cands:
                raise _Skip("scores + mask: cannot tell the scores from the mask")
            s, m = cands[0]
            if _val(m).dtype == torch.bool:
                raise _Skip("adding a boolean mask")
            return s, m, False
        if kind == "masked_fill":
            s, cond, value = n.args[0], n.args[1], _arg(n, 2, "value")
            fill = _number(value)
            if fill is None or fill > NEG_INF_THRESHOLD:
                raise _Skip(f"masked_fill with {value!r}, not -inf (or <= {NEG_INF_THRESHOLD})")
            if self.causal and _is_causal_cond(gm, cond, masked_when=True):
                return s, None, True
            return s, ("not", cond), False
        # where(keep, scores, other)
        keep, s, other = n.args[0], n.args[1], n.args[2] if len(n.args) > 2 else n.kwargs.get("other")
        fill = _number(other)
        if fill is None and isinstance(other, torch.fx.Node):
            fill = _const_fill(gm, other)
        if fill is None or fill > NEG_INF_THRESHOLD:
            raise _Skip(f"where(mask, scores, {_describe(other)}): the other value is not -inf")
        if not isinstance(s, torch.fx.Node) or _val(s) is None or tuple(_val(s).shape) != tuple(nv.shape):
            raise _Skip("where's scores operand is broadcast")
        if self.causal and _is_causal_cond(gm, keep, masked_when=False):
            return s, None, True
        return s, keep, False

    # ------------------------------------------------------------------ rewriting

    def _rewrite(self, gm, m: _Match):
        graph = gm.graph
        is_aten = isinstance(m.softmax.target, torch._ops.OpOverload)
        fake = _fake_mode([_val(m.q)])
        with graph.inserting_before(m.out):
            key = m.k
            if key is None:
                key = (graph.call_function(aten.transpose.int, (m.kt, -2, -1)) if is_aten
                       else graph.call_method("transpose", (m.kt, -2, -1)))
                key.meta["val"] = _run_fake(fake, lambda t: t.transpose(-2, -1), _val(m.kt))
            scale, scale_val = self._scale_node(graph, m.scale)
            mask = m.attn_mask
            mask_val = None
            if isinstance(mask, tuple):  # masked_fill's cond: True = masked; SDPA wants True = kept
                cond = mask[1]
                mask = (graph.call_function(aten.logical_not.default, (cond,)) if is_aten
                        else graph.call_function(torch.logical_not, (cond,)))
                mask.meta["val"] = _run_fake(fake, torch.logical_not, _val(cond))
            if mask is not None:
                mask_val = _val(mask)
            if m.dropout_module is not None:
                drop = graph.get_attr(m.dropout_module)
                drop.meta["val"] = None  # a module, not a tensor
                new = graph.call_function(sdpa_with_dropout_module, (m.q, key, m.v, mask, drop, m.is_causal, scale))
            elif is_aten:
                new = graph.call_function(aten.scaled_dot_product_attention.default,
                                          (m.q, key, m.v, mask, m.dropout_p, m.is_causal), {"scale": scale})
            else:
                new = graph.call_function(F.scaled_dot_product_attention,
                                          (m.q, key, m.v), {"attn_mask": mask, "dropout_p": m.dropout_p,
                                                            "is_causal": m.is_causal, "scale": scale})
        new.meta["val"] = _run_fake(
            fake, lambda q, k, v, am: F.scaled_dot_product_attention(q, k, v, attn_mask=am, is_causal=m.is_causal,
                                                                     scale=scale_val),
            _val(m.q), _val(key), _val(m.v), mask_val)
        for k_ in ("nn_module_stack", "stack_trace", "source_fn_stack"):
            if k_ in m.softmax.meta:
                new.meta[k_] = m.softmax.meta[k_]
        m.out.replace_all_uses_with(new)
        dead = [m.out] + m.chain
        for n in dead:  # export's metadata assertions on removed values go too
            for u in list(n.users):
                if _FN_TO_KIND.get(u.target) == "assert":
                    graph.erase_node(u)
        _erase_dead(graph, dead)

    def _scale_node(self, graph, factors):
        """The scale as a float, or (symbolic_trace graphs) a node computing it; and its value."""
        const, nodes_ = 1.0, []
        for f, op in factors:
            if isinstance(f, torch.fx.Node):
                nodes_.append((f, op))
            else:
                const = const * float(f) if op == "mul" else const / float(f)
        if not nodes_:
            return const, const
        value = const
        cur = const
        for f, op in nodes_:
            fv = float(_val(f))
            value = value * fv if op == "mul" else value / fv
            cur = graph.call_function(operator.mul if op == "mul" else operator.truediv, (cur, f))
            cur.meta["val"] = value
        cur = graph.call_function(float, (cur,))
        cur.meta["val"] = value
        return cur, value


# ---------------------------------------------------------------------- helpers


_SDPA_FUNCS = (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention)
_MASK_EVAL_LIMIT = 1 << 24        # elements: larger constant masks are left as they are


def _drop_constant_causal_mask(gm, n: torch.fx.Node) -> str | None:
    """An SDPA call given a materialized top-left causal mask that depends on no graph input
    (Hugging Face models build one where eager attention passes is_causal=True) becomes
    is_causal=True without the mask: the same attention, no (B, 1, T, T) mask per call. The mask
    is computed once here from its constant subgraph and must equal tril(ones) on every leading
    index (bool: True keeps; float: 0 keeps, -inf masks). A constant mask that keeps every
    position (what transformers' encoders materialize under torch.export when there is no
    padding, where eager passes none) is dropped: no mask at all. A graph replanned at another
    size is checked again there. Returns whether it rewrote `n`."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, n.args))
    bound.update(n.kwargs)
    mask = bound.get("attn_mask")
    if not isinstance(mask, torch.fx.Node) or bound.get("is_causal"):
        return None
    qv, kv = _val(bound["query"]), _val(bound["key"])
    if qv is None or kv is None or qv.shape[-2] != kv.shape[-2]:
        return None                    # is_causal is top-left aligned: only square scores
    keep = _constant_value(gm, mask)
    if keep is not None and keep.device.type == "meta":
        return None                    # a model built on the meta device: no values to compare
    if keep is None or keep.dim() < 2 or keep.shape[-1] != keep.shape[-2] or keep.shape[-1] != qv.shape[-2]:
        return None
    if keep.dtype != torch.bool:
        if not keep.is_floating_point() or not bool(((keep == 0) | (keep == float("-inf"))).all()):
            return None
        keep = keep == 0
    size = keep.shape[-1]
    everything = bool(keep.all())      # a mask that masks nothing (an encoder without padding)
    if not everything and not bool((keep.reshape(-1, size, size) ==
                                    torch.ones(size, size, dtype=torch.bool).tril()).all()):
        return None
    args = list(n.args)
    if len(args) > 3:
        args[3] = None
    kwargs = dict(n.kwargs)
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = None
    if not everything and len(args) > 5:
        args[5] = True
    elif not everything:
        kwargs["is_causal"] = True
    n.args, n.kwargs = tuple(args), kwargs
    return "empty" if everything else "causal"


def _constant_value(gm, node: torch.fx.Node):
    """The value of `node` when its subgraph reads no placeholder and no parameter (only
    constants and buffers), computed on real tensors; None otherwise or when too large."""
    order, seen, stack = [], set(), [node]
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "placeholder" or m.op in ("call_module", "output"):
            return None
        if m.op == "get_attr":
            t = fetch_attr(gm, str(m.target))
            if isinstance(t, torch.nn.Parameter):
                return None
        if m.op == "call_function" and not is_pure(m):
            return None
        order.append(m)
        stack.extend(m.all_input_nodes)
    v = _val(node)
    if not isinstance(v, torch.Tensor) or v.numel() > _MASK_EVAL_LIMIT:
        return None
    env: dict = {}
    pos = {m: i for i, m in enumerate(gm.graph.nodes)}
    try:
        for m in sorted(order, key=pos.__getitem__):
            if m.op == "get_attr":
                env[m] = fetch_attr(gm, str(m.target))
            else:
                args = torch.fx.node.map_arg(m.args, lambda a: env[a])
                kwargs = torch.fx.node.map_arg(m.kwargs, lambda a: env[a])
                env[m] = m.target(*args, **kwargs) if m.op == "call_function" else \
                    getattr(args[0], m.target)(*args[1:], **kwargs)
    except Exception:  # noqa: BLE001 - a subgraph that does not evaluate here is left alone
        return None
    out = env[node]
    return out if isinstance(out, torch.Tensor) else None
