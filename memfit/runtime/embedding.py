"""An embedding lookup whose weight gradient is sparse: rows (indices, gradient rows) instead of
a dense (V, D) tensor, for a weight tied to another use (a language model's output projection).

Autograd sums the contributions to a tied weight in one buffer before it reaches `.grad`. With
the default lookup the embedding's contribution is dense: `embedding_dense_backward` makes a
(V, D) tensor of zeros and adds the rows into it, while the projection's (V, D) contribution
waits in the buffer: two weight-sized tensors where one would do, at the end of backward. Here
the backward returns a sparse COO tensor of the N looked-up rows, and autograd's buffer adds a
sparse gradient into the dense one in place (torch/csrc/autograd/input_buffer.cpp, `accumulate`:
dense old, sparse new, sole owner), so `.grad` is dense and no (V, D) temporary exists.

Exact to rounding: the same rows are added, in another order where an index repeats. Only for
tied weights: alone, the gradient would stay sparse, which torch's Adam and AdamW refuse
(memfit.passes.sparse_embedding_grad checks that another use gives a dense contribution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SparseGradEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx):
        ctx.save_for_backward(ids)
        ctx.rows, ctx.padding_idx = weight.shape[0], padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        dim = grad.shape[-1]
        rows = grad.reshape(-1, dim)
        flat = ids.reshape(-1)
        if ctx.padding_idx is not None and ctx.padding_idx >= 0:
            rows = rows.masked_fill((flat == ctx.padding_idx).unsqueeze(-1), 0)   # no gradient for padding
        g = torch.sparse_coo_tensor(flat.unsqueeze(0), rows, (ctx.rows, dim), check_invariants=False)
        return None, g, None


def embedding_sparse_grad(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """`F.embedding(ids, weight, padding_idx)` whose gradient for `weight` is sparse (module doc)."""
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return F.embedding(ids, weight, padding_idx)
    return _SparseGradEmbedding.apply(ids, weight, padding_idx)
