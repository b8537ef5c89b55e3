"""The `reversible` pass: a stack of same-shape residual blocks becomes reversible couplings.

Opt-in; it changes the model's function (see docs/reversible.md). The math and the
`ReversibleStack` module are in memfit/runtime/reversible.py; this module only finds the blocks
in the captured graph, extracts each block's nodes into a child GraphModule (memfit.ir.outline)
and replaces the stack with one `call_module` to a `ReversibleStack`, which runs the children as
F and G of the couplings.

Modes:
- "pairs" (RevNet / RevViT, for training from scratch or from a reversible checkpoint): the
  residual branches r_i(h) = block_i(h) - h of consecutive blocks are F and G of one coupling,
  y1 = x1 + r_{2j}(x2), y2 = x2 + r_{2j+1}(y1), streams start as (h, h) and the stack
  returns (y1 + y2) / 2. Same compute as the original stack.
- "meft" (Liao et al. 2023, fine-tuning from a pretrained stack): F_i is the whole block
  L_i(h) = h + f_i(h), G_i = 0, streams start as (0, h) and are swapped after each coupling:
  a_{i+1} = L_i(a_i) + lam * b_i, b_{i+1} = beta * a_i; the stack returns a_n. At lam -> 0
  this is the original stack; the bound is in docs/reversible.md.

Blocks are found by module path: `blocks="transformer.h.*"` (fnmatch on dotted paths, or
"re:<regex>"), or, by default, the children of the module list with the most numbered
children seen in the graph (`nn_module_stack` of export graphs, `call_module` targets and
`nn_module_stack` of symbolic_trace graphs). Skipped blocks get a Diagnostic: shape-changing
blocks, blocks with more than one output, BatchNorm updating running statistics (recomputing
it would update them twice), blocks whose output is read outside the next block.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx

from memfit.errors import PassError
from memfit.ir.fx_utils import COMPUTE_OPS as _COMPUTE
from memfit.ir.fx_utils import module_path
from memfit.ir.outline import convexity_violation, extract, region_inputs_outputs
from memfit.passes.infra.base import Diagnostic, Pass, PassContext, PassResult, Promise
from memfit.passes.infra.regions import group_by_pattern
from memfit.passes.infra.registry import register_pass
from memfit.runtime.reversible import ReversibleStack
MODES = ("pairs", "meft")
AUX = ("copy", "delta")  # MEFT aux stream: beta * a_i, or beta * (a_i - a_{i+1})


def _auto_patterns(paths) -> list[str]:
    """Candidate block patterns, best first: numbered children of a module list (the model's
    own, when it is an nn.Sequential of blocks), the lists' own indices generalized ("stages.0.1" -> "re:stages\\.\\d+\\.\\d+", so the blocks of every
    stage are candidates together), ordered by how many graph nodes they cover (`paths`: one
    module path per compute node), so a stack of blocks wins over the nn.Sequential inside
    each block."""
    kids: dict[str, set] = {}
    cover: dict[str, int] = {}
    for p in paths:
        parts = p.split(".")
        for i in range(len(parts)):   # i = 0: the model itself is the list (a plain nn.Sequential)
            if parts[i].isdigit():
                key = r"\.".join([r"\d+" if q.isdigit() else re.escape(q) for q in parts[:i]] + [r"\d+"])
                kids.setdefault(key, set()).add(".".join(parts[:i + 1]))
                cover[key] = cover.get(key, 0) + 1
    cands = [k for k, v in kids.items() if len(v) >= 2 and (k != r"\d+" or _repeated(v, paths))]
    cands.sort(key=lambda k: (-cover[k], k.count(r"\.")))
    return ["re:" + k for k in cands]


def _repeated(kids, paths) -> bool:
    """Whether the model's own numbered children look like repeated blocks, not a pipeline of
    single layers (nn.Sequential(Linear, ReLU)): each runs 2 nodes or more, and two of them the
    same number."""
    count = {k: sum(1 for p in paths if p == k or p.startswith(k + ".")) for k in kids}
    sizes = [c for c in count.values() if c >= 2]
    return len(sizes) == len(count) and len(set(sizes)) < len(sizes)


def _auto_pattern(paths) -> str | None:
    c = _auto_patterns(paths)
    return c[0] if c else None


def find_blocks(gm: torch.fx.GraphModule, pattern: str = "") -> "OrderedDict[str, list[torch.fx.Node]]":
    """{block path: its compute nodes in graph order} for the blocks matching `pattern`
    (auto-detected when empty); a node belongs to the shortest matching prefix of its path."""
    nodes = [n for n in gm.graph.nodes if n.op in _COMPUTE]
    if not pattern:
        pattern = _auto_pattern([q for q in map(module_path, nodes) if q]) or ""  # best candidate only
        if not pattern:
            return OrderedDict()
    return group_by_pattern(nodes, pattern, module_path)


def _val(n):
    return n.meta.get("val") if isinstance(n, torch.fx.Node) else None


_BN_TRAIN_OPS = {"_native_batch_norm_legit_functional", "cudnn_batch_norm", "miopen_batch_norm"}


def _stateful_reason(gm, nodes) -> str | None:
    """Why recomputing these nodes would change state (BatchNorm statistics, buffer writes)."""
    for n in nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
                return (f"stateful BatchNorm {n.target} in train mode: recomputing it in backward would "
                        "update its running statistics twice (freeze it with .eval() first)")
        elif n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
            if name in _BN_TRAIN_OPS or (name in ("batch_norm", "native_batch_norm", "_native_batch_norm_legit")
                                         and any(a is True for a in n.args[5:6])):
                return (f"stateful batch norm {n.format_node()} in train mode: recomputing it in "
                        "backward would update its running statistics twice")
            if getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable:
                return f"in-place write {n.format_node()}: recomputing the block would repeat it"
        elif n.op == "call_method" and str(n.target).endswith("_") and not str(n.target).startswith("__"):
            if str(n.target) not in ("relu_", "add_", "mul_", "clamp_", "div_", "sub_"):
                return f"in-place method {n.target}: recomputing the block would repeat it"
    return None


def _has_rng(gm, nodes) -> bool:
    for n in nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and m.training:
                return True
        t = str(getattr(n.target, "__name__", n.target)).lower()
        if any(k in t for k in ("dropout", "bernoulli", "rand", "normal_", "uniform_")):
            return True
    return False


@dataclass
class _Block:
    path: str
    nodes: list
    inputs: list       # outside nodes read, graph order
    output: torch.fx.Node | None
    hidden: torch.fx.Node | None = None


def _analyze(gm, path, nodes, order) -> tuple[_Block | None, str | None]:
    inputs, outputs = region_inputs_outputs(nodes)
    if len(outputs) != 1:
        return None, f"block has {len(outputs)} outputs read outside it; a coupling needs exactly one"
    if convexity_violation(nodes, order) is not None:
        return None, "block's nodes are interleaved with nodes that depend on them (not convex)"
    reason = _stateful_reason(gm, nodes)
    if reason:
        return None, reason
    out_v = _val(outputs[0])
    if not isinstance(out_v, torch.Tensor) or not out_v.is_floating_point():
        return None, "block output is not a floating-point tensor"
    return _Block(path, nodes, inputs, outputs[0]), None


def _same_shape(a, b) -> bool:
    va, vb = _val(a), _val(b)
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return False
    if va.dtype != vb.dtype or va.dim() != vb.dim():
        return False
    try:
        return all(bool(x == y) for x, y in zip(va.shape, vb.shape))
    except Exception:  # noqa: BLE001 - undecidable symbolic comparison
        return False


@register_pass
@dataclass(frozen=True)
class Reversible(Pass):
    """Turn stacks of same-shape residual blocks into reversible couplings (see module doc).

    blocks: fnmatch pattern (or "re:<regex>") on block module paths; "" auto-detects.
    mode: "pairs" (RevNet/RevViT) or "meft" (pretrained start, see docs/reversible.md).
    lam, beta: scaling of the two streams (None: 1 in pairs mode; lam 0.1, beta 1 in meft).
    anchor_every: store every k-th coupling's input (0: none). check: store every input and
    measure the reconstruction error per block (debug; memory grows with depth again).
    aux (meft): what the second stream carries: "copy" (beta * a_i, G = 0, as in MEFT) or
    "delta" (beta * (a_i - a_{i+1}), G(y) = -beta * y): the init error then scales with the
    blocks' residual updates instead of the hidden states.
    """

    name: ClassVar[str] = "reversible"
    promise: ClassVar[Promise] = Promise("changes_function")

    blocks: str = ""
    mode: str = "pairs"
    lam: float | None = None
    beta: float | None = None
    anchor_every: int = 0
    check: bool = False
    warn_threshold: float = 1e-3
    min_blocks: int = 2
    aux: str = "copy"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.aux not in AUX:
            raise ValueError(f"aux must be one of {', '.join(AUX)}, got {self.aux!r}")
        if self.anchor_every < 0:
            raise ValueError(f"anchor_every must be >= 0, got {self.anchor_every}")
        if self.min_blocks < 1:
            raise ValueError(f"min_blocks must be >= 1, got {self.min_blocks}")
        for k in ("lam", "beta"):
            v = getattr(self, k)
            if v is not None and v == 0:
                raise ValueError(f"{k} must be nonzero (the inverse divides by it)")

    def scaling(self) -> tuple[float, float]:
        lam_d, beta_d = (0.1, 1.0) if self.mode == "meft" else (1.0, 1.0)
        return (self.lam if self.lam is not None else lam_d, self.beta if self.beta is not None else beta_d)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = {"stacks": 0, "blocks_converted": 0, "blocks_skipped": 0, "couplings": 0}
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        if self.blocks:
            patterns = [self.blocks]
        else:
            # Auto-detect: the first candidate pattern (most nodes covered) that gives a stack.
            patterns = _auto_patterns([module_path(n) for n in gm.graph.nodes
                                       if n.op in _COMPUTE and module_path(n)])
        chosen = None
        for pat in patterns:
            regions = find_blocks(gm, pat)
            if not regions:
                continue
            if not self.blocks and sorted(len(v) for v in regions.values())[len(regions) // 2] < 3:
                continue  # children that are single layers (an nn.Sequential's) are not blocks
            plan = self._plan_runs(gm, regions, order)
            if chosen is None or any(len(r) >= self.min_blocks for r in plan[0]):
                chosen = plan
            if any(len(r) >= self.min_blocks for r in plan[0]):
                break
        if chosen is None:
            diag = Diagnostic(self.name, "no repeated blocks found" + (
                f" matching {self.blocks!r}" if self.blocks else " (give blocks='path.*')"), level="warning")
            return PassResult(gm, False, stats, [diag])
        runs, diags, skipped = chosen
        stats["blocks_skipped"] += skipped
        lam, beta = self.scaling()
        modified = False
        for run in runs:
            if len(run) < self.min_blocks:
                stats["blocks_skipped"] += len(run)
                diags.append(Diagnostic(self.name, f"skipped {', '.join(b.path for b in run)}: a stack of "
                                        f"{len(run)} block(s) is shorter than min_blocks={self.min_blocks}",
                                        node=run[0].path))
                continue
            self._rewrite(gm, run, lam, beta, stats)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified, stats, diags)

    def _plan_runs(self, gm, regions, order):
        """Analyse each block and chain consecutive valid ones: (runs, diagnostics, skipped)."""
        diags: list[Diagnostic] = []
        skipped = 0
        runs: list[list[_Block]] = []
        cur: list[_Block] = []
        prev: _Block | None = None

        def close():
            nonlocal cur
            if cur:
                runs.append(cur)
            cur = []

        for path, nodes in regions.items():
            blk, why = _analyze(gm, path, nodes, order)
            if blk is not None:
                if prev is not None and cur and prev.output in blk.inputs:
                    blk.hidden = prev.output
                    # The previous block's output may feed only this block.
                    if any(u not in set(blk.nodes) for u in prev.output.users):
                        why = f"output of {prev.path} is also read outside {path}"
                        blk = None
                        close()
                else:
                    close()
                    cands = [a for a in blk.inputs if a.op != "get_attr" and _same_shape(a, blk.output)]
                    if len(cands) > 1:
                        # Shared inputs (masks, positions) reach every block; the hidden state only this one.
                        nxt = list(regions.values())
                        idx = list(regions).index(path)
                        later = set(a for ns in nxt[idx + 1:idx + 2] for n in ns for a in n.all_input_nodes)
                        cands = [a for a in cands if a not in later] or cands
                    if len(cands) == 1:
                        blk.hidden = cands[0]
                    else:
                        why = ("block changes the shape or dtype of its input (a coupling needs "
                               "same-shape blocks)" if not cands else
                               f"cannot tell the hidden input among {[a.name for a in cands]}")
                        blk = None
                if blk is not None and not _same_shape(blk.hidden, blk.output):
                    why, blk = "block changes the shape or dtype of its input (a coupling needs same-shape blocks)", None
                    close()
            if blk is None:
                skipped += 1
                diags.append(Diagnostic(self.name, f"skipped block {path}: {why}", node=path))
                close()
                prev = None
                continue
            cur.append(blk)
            prev = blk
        close()

        return runs, diags, skipped

    def _rewrite(self, gm, run: list[_Block], lam, beta, stats) -> None:
        graph = gm.graph
        ext: list = []
        ext_index = []
        children = []
        rng = False
        for b in run:
            mine = [a for a in b.inputs if a is not b.hidden]
            for a in mine:
                if a not in ext:
                    ext.append(a)
            # the stack holds its blocks outside _modules: they own their modules, whose
            # parameters the couplings' backward differentiates
            children.append(extract(gm, b.nodes, [b.hidden, *mine], [b.output], class_name="ReversibleBlock",
                                    input_names=["x"] + [f"ext_{i}_{a.name}" for i, a in enumerate(mine)],
                                    borrow=False))
            ext_index.append([ext.index(a) for a in mine])
            rng |= _has_rng(gm, b.nodes)
        stack = ReversibleStack(children, ext_index, [b.path for b in run], mode=self.mode, lam=lam, beta=beta,
                                anchor_every=self.anchor_every, check=self.check,
                                warn_threshold=self.warn_threshold, preserve_rng=rng, aux=self.aux)
        k = 0
        while hasattr(gm, f"reversible_{k}"):
            k += 1
        attr = f"reversible_{k}"
        gm.add_module(attr, stack)
        last = run[-1]
        with graph.inserting_after(last.nodes[-1]):
            call = graph.call_module(attr, (run[0].hidden, *ext))
        call.meta["val"] = last.output.meta.get("val")
        if "tensor_meta" in last.output.meta:
            call.meta["tensor_meta"] = last.output.meta["tensor_meta"]
        parent = run[0].path.rsplit(".", 1)[0]
        call.meta["nn_module_stack"] = {parent: (parent, type(None))}
        last.output.replace_all_uses_with(call)
        call.args = (run[0].hidden, *ext)  # replace_all_uses_with does not touch the call's own args
        for b in reversed(run):
            for n in reversed(b.nodes):
                if n.users:
                    raise PassError(f"reversible: {n.format_node()} of {b.path} is still used after the rewrite")
                graph.erase_node(n)
        stats["stacks"] += 1
        stats["blocks_converted"] += len(run)
        stats["couplings"] += len(stack._couplings)


def stacks(module: torch.nn.Module) -> list[ReversibleStack]:
    """The ReversibleStacks of an optimized module (or of a graph module) made by this pass."""
    gm = getattr(module, "graph_module", module)
    return [m for m in gm.modules() if isinstance(m, ReversibleStack)]


def set_recompute(module: torch.nn.Module, flag: bool) -> None:
    """False: run the same couplings with stored activations (the gradient reference)."""
    for s in stacks(module):
        s.recompute = flag


def make_reversible(model: torch.nn.Module, example_inputs=(), example_kwargs=None, *, blocks: str = "",
                    mode: str = "pairs", capture_method: str = "auto", dynamic: bool = True,
                    **options):
    """Capture `model` and run the reversible pass on it; returns an OptimizedModule sharing the
    model's parameters (the model itself is not modified). `options`: fields of Reversible.
    The result's `.pass_result` holds the pass's stats and diagnostics; `stacks(result)` its
    ReversibleStacks."""
    from memfit.ir.capture import capture
    from memfit.ir.module import OptimizedModule

    pass_ = Reversible(blocks=blocks, mode=mode, **options)
    cap = capture(model, example_inputs, example_kwargs, method=capture_method, dynamic=dynamic)
    res = pass_.run(cap.gm, PassContext(captured=cap))
    res.gm.graph.lint()
    res.gm.recompile()
    return OptimizedModule(model, cap, res.gm, pass_result=res, changes_function=True)
