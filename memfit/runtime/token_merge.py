"""Token merging (ToMe, Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023): the math.

Pure functions over tensors; no modules, no state. The pass and the module wrappers in
memfit/passes/token_merge.py call them.

Shapes: x (B, N, C) tokens, k (B, H, N, D) keys, size (B, N, 1) how many original tokens
each token stands for (float, no gradient).

- `bipartite_soft_matching(metric, r, protected)`: split the unprotected tokens alternately
  into sets A (even) and B (odd), score every A token against every B token by cosine
  similarity of `metric` (keys averaged over heads, as ToMe does), and merge the r A tokens
  with the highest best-score into their best B match. The first `protected` tokens (class
  token, DeiT's distillation token) take no part and keep their positions.
- `merge_wavg(info, x, size)`: size-weighted average of the merged tokens (sizes add up).
- `attention_bias(size)`: the log(size) term proportional attention adds to the logits,
  (B, 1, 1, N); also usable as `attn_mask` of scaled_dot_product_attention.
- `unmerge(info, x)`: undo one merge step for dense prediction: every original token gets
  the feature of the token it was merged into (Liang et al. 2022, "Expediting Large-Scale
  Vision Transformer for Dense Prediction without Fine-tuning", reconstruct by copying).

Determinism: argsort is stable and nothing random is involved, so the same inputs give the
same merges, which is what makes a checkpoint recompute match the first forward.
Gradients flow through the gathers, the scatter-add and the division; the matching itself
(indices) is discrete and computed without gradient, as in ToMe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class MergeInfo:
    """The merge map of one bipartite matching step (indices into the unprotected tokens).

    `protected`: leading tokens that take no part; `n_in`: tokens before the merge.
    `unm_idx` (B, nA - r, 1): A tokens kept; `src_idx` (B, r, 1): A tokens merged;
    `dst_idx` (B, r, 1): the B token each merged A token went to.
    Output order: protected tokens, kept A tokens, then all B tokens.
    """

    protected: int
    n_in: int
    r: int
    unm_idx: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    @property
    def n_out(self) -> int:
        return self.n_in - self.r


def merged_r(n_tokens: int, r: int, protected: int = 1) -> int:
    """How many tokens one step really merges: at most half of the unprotected ones."""
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    return max(0, min(r, (n_tokens - protected) // 2))


def r_schedule(r, num_layers: int, schedule: str = "constant") -> list[int]:
    """Tokens to merge in each of `num_layers` blocks.

    `r`: an int (with `schedule` "constant": r in every block; "decreasing": a linear ramp
    from 2r down to 0, the same total, the decreasing schedule of the ToMe paper, section 4.1)
    or a per-layer list (used as is; its length must be num_layers).
    """
    if isinstance(r, (list, tuple)):
        rs = [int(v) for v in r]
        if len(rs) != num_layers:
            raise ValueError(f"per-layer r has {len(rs)} entries for {num_layers} blocks")
        if any(v < 0 for v in rs):
            raise ValueError(f"r must be >= 0 in every block, got {rs}")
        return rs
    if not isinstance(r, int) or isinstance(r, bool) or r < 0:
        raise ValueError(f"r must be a non-negative int or a per-layer list, got {r!r}")
    if schedule == "constant":
        return [r] * num_layers
    if schedule == "decreasing":
        if num_layers == 1:
            return [r]
        step = 2 * r / (num_layers - 1)
        return [int(round(2 * r - step * i)) for i in range(num_layers)]
    raise ValueError(f"unknown r schedule {schedule!r} (choose constant or decreasing)")


def tokens_per_layer(n_tokens: int, rs: Sequence[int], protected: int = 1) -> list[int]:
    """Tokens entering each block and leaving the last one: len(rs) + 1 numbers.

    Merging sits between attention and MLP, so block i's attention sees entry i and its MLP
    (and block i + 1) entry i + 1.
    """
    out = [n_tokens]
    for r in rs:
        out.append(out[-1] - merged_r(out[-1], r, protected))
    return out


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int = 1) -> MergeInfo | None:
    """Match tokens for one merge step; None when nothing is merged (r = 0 or too few tokens).

    metric (B, N, D): the similarity features (keys averaged over heads).
    """
    B, N, _ = metric.shape
    r = merged_r(N, r, protected)
    if r == 0:
        return None
    with torch.no_grad():
        m = metric[:, protected:]
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        a, b = m[:, ::2], m[:, 1::2]                    # (B, nA, D), (B, nB, D)
        scores = a @ b.transpose(-1, -2)                # (B, nA, nB) cosine similarity
        node_max, node_idx = scores.max(dim=-1)         # best B match of each A token
        order = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]  # (B, nA, 1)
        unm_idx = order[:, r:].sort(dim=1).values       # kept A tokens, in their original order
        src_idx = order[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)
    return MergeInfo(protected, N, r, unm_idx, src_idx, dst_idx)


def _merge(info: MergeInfo, x: torch.Tensor) -> torch.Tensor:
    """Sum each merged A token into its B token; (B, N, C) -> (B, N - r, C)."""
    P = info.protected
    head, rest = x[:, :P], x[:, P:]
    src, dst = rest[:, ::2], rest[:, 1::2]
    C = x.shape[-1]
    unm = src.gather(1, info.unm_idx.expand(-1, -1, C))
    moved = src.gather(1, info.src_idx.expand(-1, -1, C))
    dst = dst.scatter_add(1, info.dst_idx.expand(-1, -1, C), moved)
    return torch.cat([head, unm, dst], dim=1)


def merge_wavg(info: MergeInfo | None, x: torch.Tensor, size: torch.Tensor | None = None):
    """Merge by size-weighted average; returns (x (B, N - r, C), size (B, N - r, 1)).

    `size` None means every token stands for one original token.
    With `info` None (nothing merged) the inputs come back unchanged, no op recorded.
    """
    if info is None:
        return x, size
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype, device=x.device)
    x = _merge(info, x * size)
    size = _merge(info, size)
    return x / size, size


def attention_bias(size: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """log(size) as an additive attention bias (B, 1, 1, N), or None for unit sizes.

    Proportional attention (ToMe, eq. 1): softmax(q k^T / sqrt(d) + log s), so a token that
    stands for s tokens gets the attention weight s tokens would.
    """
    if size is None:
        return None
    bias = size.log()[:, None, None, :, 0]
    return bias if dtype is None else bias.to(dtype)


def unmerge(info: MergeInfo | None, x: torch.Tensor) -> torch.Tensor:
    """Undo one merge step: (B, N - r, C) -> (B, N, C); merged tokens copy their result."""
    if info is None:
        return x
    P = info.protected
    B, _, C = x.shape
    n_unm = info.unm_idx.shape[1]
    head, unm, dst = x[:, :P], x[:, P:P + n_unm], x[:, P + n_unm:]
    src = dst.gather(1, info.dst_idx.expand(-1, -1, C))
    n_rest = info.n_in - P
    n_a = (n_rest + 1) // 2
    a = x.new_zeros(B, n_a, C)
    a = a.scatter(1, info.unm_idx.expand(-1, -1, C), unm)
    a = a.scatter(1, info.src_idx.expand(-1, -1, C), src)
    rest = torch.stack([a[:, : n_rest // 2], dst], dim=2).reshape(B, 2 * (n_rest // 2), C)
    if n_a > n_rest // 2:  # odd count: the last token is in A
        rest = torch.cat([rest, a[:, -1:]], dim=1)
    return torch.cat([head, rest], dim=1)


def unmerge_all(infos: Sequence[MergeInfo | None], x: torch.Tensor) -> torch.Tensor:
    """Undo a whole sequence of merge steps (the infos in the order they were applied)."""
    for info in reversed(list(infos)):
        x = unmerge(info, x)
    return x


def token_merge_step(x: torch.Tensor, k: torch.Tensor, size: torch.Tensor | None, r: int,
                     protected: int = 1):
    """One ToMe step between attention and MLP: match on keys averaged over heads, merge x.

    x (B, N, C), k (B, H, N, D). Returns (x', size', info); r = 0 returns the inputs unchanged.
    """
    info = bipartite_soft_matching(k.mean(dim=1), r, protected)
    x, size = merge_wavg(info, x, size)
    return x, size, info
