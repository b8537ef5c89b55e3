"""Token merging (ToMe) for ViT-like models: module rewrite and the `token-merge` pass.

`apply_token_merging(model, r=...)` returns a new module sharing the model's parameters (same
state_dict keys) in which every supported transformer block merges r tokens between its
attention and its MLP (Bolya et al. 2023): matching on the keys averaged over heads,
size-weighted averages, proportional attention (log size added to the attention logits; the
attention_mask of scaled_dot_product_attention on the SDPA road) and the leading class /
distillation tokens protected. `unmerge=True` restores full token resolution after the last
block (Liang et al. 2022), so dense-prediction heads keep their (B, N, C) input.

Supported blocks (checked by their attributes, not their class names):
- pre-LN blocks `norm1, attn, norm2, mlp` with `attn.qkv, attn.proj` and `attn.heads` or
  `attn.num_heads` (examples/vit_like.py, timm-style ViT and DeiT without drop-path);
- Hugging Face transformers 5 `ViTLayer` / `DeiTLayer` layout: `layernorm_before, attention
  (q_proj, k_proj, v_proj, o_proj), dropout, layernorm_after, mlp`, with whatever attention
  implementation the config names (eager, sdpa).

How token sizes travel from block to block: the blocks of one model share a small record;
block i reads the sizes block i - 1 left there and writes its own, so the parent's loop over
blocks (a ModuleList, nn.Sequential or transformers' encoder) needs no change. A checkpoint
recompute of block i reads the same record, and the matching is deterministic, so the merges
it recomputes are the ones of the first forward. The blocks must run in order, once each per
forward (true of ViT, DeiT and their encoders).

`token-merge{r=8}` is a source rewrite (memfit.passes.infra.base.SourceRewrite): a pipeline
naming it applies it to the module and captures the result; the graph passes of the pipeline
then run on the merged graph (memfit.passes.infra.pipeline).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from memfit.errors import PassError
from memfit.passes.infra.base import Diagnostic, Promise, RewriteResult, SourceRewrite
from memfit.passes.infra.registry import register_pass
from memfit.runtime.token_merge import (attention_bias, r_schedule, token_merge_step,
                                        tokens_per_layer, unmerge_all)

# symbolic_trace keeps these as single call_function nodes (their shape logic needs ints).
torch.fx.wrap("token_merge_step")
torch.fx.wrap("attention_bias")
torch.fx.wrap("unmerge_all")
torch.fx.wrap("_ones_size")


def _ones_size(x: torch.Tensor) -> torch.Tensor:
    """Unit sizes (B, N, 1) for x (B, N, C)."""
    return torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)


class _SharedRecord:
    """Per-model side channel: sizes and merge maps each block leaves for the next.

    Holds tensors of the latest forward only; a new forward overwrites them block by block.
    """

    def __init__(self):
        self.sizes: dict[int, Any] = {}
        self.infos: dict[int, Any] = {}
        self.tokens: dict[int, tuple[int, int]] = {}


@dataclass
class _BlockConfig:
    index: int
    r: int
    protected: int
    prop_attn: bool
    sdpa: bool
    unmerge: bool          # this block is the last one and restores full resolution
    record: _SharedRecord = field(repr=False)


@dataclass(frozen=True)
class TokenMergeInfo:
    """What apply_token_merging did: blocks patched (module paths), r per block, protected."""

    blocks: tuple[str, ...]
    r: tuple[int, ...]
    protected: int
    unmerge: bool
    skipped: tuple[str, ...] = ()

    def tokens_per_layer(self, n_tokens: int) -> list[int]:
        """Tokens entering each patched block, then leaving the last (len(blocks) + 1)."""
        return tokens_per_layer(n_tokens, self.r, self.protected)


# --- block forwards -------------------------------------------------------------------------

def _block_io(cfg: _BlockConfig, x):
    """Sizes entering this block (None: all ones)."""
    return cfg.record.sizes.get(cfg.index - 1) if cfg.index > 0 else None


def _merge_and_record(cfg: _BlockConfig, x, k, size):
    n_in = x.shape[1]
    if cfg.r > 0:
        if size is None:
            size = _ones_size(x)
        x, size, info = token_merge_step(x, k, size, cfg.r, cfg.protected)
    else:
        info = None
    cfg.record.sizes[cfg.index] = size
    cfg.record.infos[cfg.index] = info
    if isinstance(n_in, int) and isinstance(x.shape[1], int):
        cfg.record.tokens[cfg.index] = (n_in, x.shape[1])
    return x, size


def _finish(cfg: _BlockConfig, x):
    if cfg.unmerge:
        x = unmerge_all([cfg.record.infos[i] for i in range(cfg.index + 1)], x)
    return x


def _prenorm_forward(self, x):
    """Block `x + attn(norm1(x))`, merge, `x + mlp(norm2(x))` with explicit attention."""
    cfg: _BlockConfig = self._memfit_tome
    size = _block_io(cfg, x)
    attn = self.attn
    h = self.norm1(x)
    B, N, D = h.shape
    heads = attn.heads if hasattr(attn, "heads") else attn.num_heads
    qkv = attn.qkv(h).reshape(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
    bias = attention_bias(size) if (cfg.prop_attn and size is not None) else None
    drop = getattr(attn, "attn_drop", None)
    if cfg.sdpa:
        p = drop.p if (drop is not None and self.training) else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p, scale=attn.scale)
    else:
        att = (q @ k.transpose(-2, -1)) * attn.scale  # (B, H, N, N)
        if bias is not None:
            att = att + bias
        att = att.softmax(dim=-1)
        if drop is not None:
            att = drop(att)
        y = att @ v
    x = x + attn.proj(y.transpose(1, 2).reshape(B, N, D))
    x, size = _merge_and_record(cfg, x, k, size)
    x = x + self.mlp(self.norm2(x))
    return _finish(cfg, x)


def _hf_forward(self, hidden_states, attention_mask=None, **kwargs):
    """transformers ViTLayer/DeiTLayer forward with a merge between attention and MLP."""
    cfg: _BlockConfig = self._memfit_tome
    size = _block_io(cfg, hidden_states)
    attn = self.attention
    residual = hidden_states
    h = self.layernorm_before(hidden_states)
    input_shape = h.shape[:-1]
    hidden_shape = (*input_shape, -1, attn.head_dim)
    q = attn.q_proj(h).view(hidden_shape).transpose(1, 2)
    k = attn.k_proj(h).view(hidden_shape).transpose(1, 2)
    v = attn.v_proj(h).view(hidden_shape).transpose(1, 2)
    bias = attention_bias(size, q.dtype) if (cfg.prop_attn and size is not None) else None
    if attention_mask is not None and attention_mask.shape[-1] != k.shape[-2]:
        # transformers builds an all-attend mask for the unmerged tokens when traced (ViT and
        # DeiT take no attention mask, images have no padding): it masks nothing, drop it
        attention_mask = None
    if attention_mask is not None and bias is not None:
        bias = attention_mask + bias
    elif bias is None:
        bias = attention_mask
    interface = _hf_attention_interface(attn)
    y, _ = interface(attn, q, k, v, bias, dropout=0.0 if not attn.training else attn.attention_dropout,
                     scaling=attn.scaling, **kwargs)
    y = attn.o_proj(y.reshape(*input_shape, -1).contiguous())
    hidden_states = self.dropout(y) + residual
    hidden_states, size = _merge_and_record(cfg, hidden_states, k, size)
    residual = hidden_states
    h = self.mlp(self.layernorm_after(hidden_states))
    hidden_states = self.dropout(h) + residual
    return _finish(cfg, hidden_states)


def _hf_attention_interface(attn):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(attn).__module__], "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)


def _kind(block: nn.Module) -> str | None:
    """Which supported layout `block` has, or None."""
    names = set(block._modules)
    if {"norm1", "attn", "norm2", "mlp"} <= names:
        a = block.attn
        if (isinstance(getattr(a, "qkv", None), nn.Linear) and isinstance(getattr(a, "proj", None), nn.Module)
                and (hasattr(a, "heads") or hasattr(a, "num_heads")) and hasattr(a, "scale")):
            # timm's Block also has drop_path / layer scale / q_norm modules we do not replay
            extra = names - {"norm1", "attn", "norm2", "mlp"}
            if not extra or all(isinstance(block._modules[n], nn.Identity) for n in extra):
                return "prenorm"
    if {"layernorm_before", "attention", "layernorm_after", "mlp", "dropout"} <= names:
        a = block.attention
        if all(isinstance(getattr(a, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and hasattr(a, "config") and hasattr(a, "scaling"):
            return "hf"
    return None


_FORWARDS = {"prenorm": _prenorm_forward, "hf": _hf_forward}
_CLASS_CACHE: dict[tuple[type, str], type] = {}


def _merging_class(cls: type, kind: str) -> type:
    key = (cls, kind)
    if key not in _CLASS_CACHE:
        _CLASS_CACHE[key] = type(f"TokenMerging{cls.__name__}", (cls,),
                                 {"forward": _FORWARDS[kind], "__module__": __name__})
    return _CLASS_CACHE[key]


def _looks_like_block(m: nn.Module) -> bool:
    names = set(m._modules)
    return bool(({"attn", "mlp"} <= names) or ({"attention", "mlp"} <= names))


def find_blocks(model: nn.Module) -> tuple[list[tuple[str, str]], list[str]]:
    """(path, kind) of every supported block in forward order, and skipped block-like paths."""
    found, skipped = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p, _ in found):
            continue
        kind = _kind(m)
        if kind is not None:
            found.append((name, kind))
        elif _looks_like_block(m):
            skipped.append(name)
    return found, skipped


def count_protected(model: nn.Module) -> int:
    """Leading special tokens: 1 for a class token, 2 with DeiT's distillation token."""
    names = [n.rsplit(".", 1)[-1] for n, _ in model.named_parameters()]
    return int("cls_token" in names) + int("distillation_token" in names)


def _clone_path(root: nn.Module, path: str, cache: dict) -> nn.Module:
    """Shallow copy of the modules along `path` (parameters shared); returns the new leaf."""
    node = cache[""]
    prefix = ""
    for part in path.split(".") if path else []:
        prefix = f"{prefix}.{part}" if prefix else part
        if prefix not in cache:
            child = copy.copy(node._modules[part])
            child._modules = dict(child._modules)
            child._parameters = dict(child._parameters)
            child._buffers = dict(child._buffers)
            node._modules[part] = child
            cache[prefix] = child
        node = cache[prefix]
    return node


def apply_token_merging(model: nn.Module, r=0, *, schedule: str = "constant", protected: int | None = None,
                        prop_attn: bool = True, sdpa: bool = False, unmerge: bool = False) -> nn.Module:
    """A new module sharing `model`'s parameters whose blocks merge tokens (ToMe).

    `r`: tokens merged per block (int, with `schedule` "constant" or "decreasing"), or a
    per-block list. `protected`: leading tokens never merged (None: count the class and
    distillation tokens). `prop_attn`: add log(size) to the attention logits. `sdpa`: run
    the explicit attention of pre-LN blocks with scaled_dot_product_attention (transformers
    blocks follow their config's attn_implementation). `unmerge`: the last block restores
    all N tokens (B, N, C), for dense prediction heads.

    r = 0 everywhere gives the original function. The result carries
    `memfit_token_merge` (a TokenMergeInfo). Raises PassError when no block is supported.
    """
    if not isinstance(model, nn.Module):
        raise PassError(f"apply_token_merging expects an nn.Module, got {type(model).__name__}")
    blocks, skipped = find_blocks(model)
    if not blocks:
        hint = f" (block-like modules with an unsupported layout: {', '.join(skipped[:4])})" if skipped else ""
        raise PassError(f"token merging found no supported transformer block in {type(model).__name__}{hint}; "
                        "supported: pre-LN blocks norm1/attn(qkv, proj)/norm2/mlp and transformers "
                        "ViTLayer/DeiTLayer layouts")
    try:
        rs = r_schedule(list(r) if isinstance(r, (list, tuple)) else r, len(blocks), schedule)
    except ValueError as e:
        raise PassError(f"token merging: {e}") from None
    if protected is None:
        protected = count_protected(model)
    if protected < 0:
        raise PassError(f"token merging: protected must be >= 0, got {protected}")
    new = copy.copy(model)
    new._modules = dict(model._modules)
    new._parameters = dict(model._parameters)
    new._buffers = dict(model._buffers)
    cache = {"": new}
    record = _SharedRecord()
    for i, (path, kind) in enumerate(blocks):
        blk = _clone_path(new, path, cache)
        blk.__class__ = _merging_class(type(blk), kind)
        blk._memfit_tome = _BlockConfig(index=i, r=rs[i], protected=protected, prop_attn=prop_attn, sdpa=sdpa,
                                        unmerge=unmerge and i == len(blocks) - 1, record=record)
    new.memfit_token_merge = TokenMergeInfo(tuple(p for p, _ in blocks), tuple(rs), protected, unmerge,
                                            tuple(skipped))
    return new


def model_tokens_per_layer(model: nn.Module, example_inputs=(), example_kwargs=None) -> list[int]:
    """Run one no-grad forward of a token-merging module; tokens entering each block, then
    leaving the last (read from the forward, not computed from the schedule)."""
    info = getattr(model, "memfit_token_merge", None)
    if info is None:
        raise PassError("model_tokens_per_layer needs a module returned by apply_token_merging")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    with torch.no_grad():
        model(*example_inputs, **dict(example_kwargs or {}))
    record = _record_of(model)
    n = len(info.blocks)
    return [record.tokens[i][0] for i in range(n)] + [record.tokens[n - 1][1]]


def _record_of(model: nn.Module) -> _SharedRecord:
    for m in model.modules():
        cfg = getattr(m, "_memfit_tome", None)
        if cfg is not None:
            return cfg.record
    raise PassError("not a token-merging module")


# --- the pass -------------------------------------------------------------------------------

@register_pass
@dataclass(frozen=True)
class TokenMerge(SourceRewrite):
    """Token merging (ToMe) between attention and MLP of each ViT block; changes the function.

    Options: r (per block), rs (per-block list, overrides r; text form `rs=8:8:4:0`),
    schedule (constant | decreasing), protected (-1: count class/distillation tokens),
    prop_attn, sdpa, unmerge. A source rewrite: it runs on the module before capture
    (pipelines run it first, whatever its place in the text).
    """

    name: ClassVar[str] = "token-merge"
    promise: ClassVar[Promise] = Promise("changes_function")

    r: int = 8
    rs: tuple[int, ...] = ()
    schedule: str = "constant"
    protected: int = -1
    prop_attn: bool = True
    sdpa: bool = False
    unmerge: bool = False

    def __post_init__(self):
        if self.r < 0 or any(v < 0 for v in self.rs):
            raise ValueError("r must be >= 0")
        if self.schedule not in ("constant", "decreasing"):
            raise ValueError(f"unknown schedule {self.schedule!r} (constant or decreasing)")

    def apply(self, model: nn.Module, example_inputs=(), example_kwargs=None) -> RewriteResult:
        """Merge tokens in `model` (a new module sharing its parameters); with example inputs,
        count the tokens per layer (one forward) and say where r was more than could merge."""
        new = apply_token_merging(model, list(self.rs) if self.rs else self.r, schedule=self.schedule,
                                  protected=None if self.protected < 0 else self.protected,
                                  prop_attn=self.prop_attn, sdpa=self.sdpa, unmerge=self.unmerge)
        info: TokenMergeInfo = new.memfit_token_merge
        diags = [Diagnostic(self.name, "unsupported block layout, not merged", node=p) for p in info.skipped]
        if not any(info.r):
            diags.append(Diagnostic(self.name, "r = 0 in every block: model left unchanged"))
            return RewriteResult(model, modified=False, stats={"blocks_patched": 0, "tokens_merged": 0},
                                 diagnostics=diags)
        meta = {"blocks": list(info.blocks), "r": list(info.r), "protected": info.protected}
        merged = 0
        if example_inputs or example_kwargs:
            tokens = model_tokens_per_layer(new, example_inputs, example_kwargs)
            meta["tokens_per_layer"] = tokens
            diags.append(Diagnostic(self.name, f"tokens per layer: {tokens}"))
            for i, (blk, r) in enumerate(zip(info.blocks, info.r)):
                done = tokens[i] - tokens[i + 1]
                if done < r:
                    diags.append(Diagnostic(self.name, f"r={r} asked, {done} merged: at most half of the "
                                                       f"{tokens[i] - info.protected} unprotected tokens", node=blk))
            merged = sum(a - b for a, b in zip(tokens[:-1], tokens[1:]))
        return RewriteResult(new, modified=True, stats={"blocks_patched": len(info.blocks), "tokens_merged": merged},
                             diagnostics=diags, meta={"token_merge": meta})


def token_merge_pass_info(gm: torch.fx.GraphModule) -> dict | None:
    """What the token-merge pass recorded on a graph (tokens per layer, r, blocks), or None."""
    return getattr(gm, "meta", {}).get("token_merge")
