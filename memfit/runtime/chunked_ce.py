"""Linear + cross-entropy over rows in chunks: the logits (N, V) never exist whole.

    loss = cross_entropy(h @ W.T + b, target)        h (N, D), W (V, D), b (V,) or None, target (N,)

The unmodified step holds, at its worst, the logits (N, V), the log-softmax that
cross-entropy saves for backward (N, V) and the gradient of the logits (N, V); at a GPT-2
vocabulary (V = 50257) these dwarf the rest of the activations. As in Liger-Kernel's fused
linear cross-entropy and Apple's Cut Cross-Entropy (Wijmans et al., 2024), this computes the
loss chunk by chunk of rows:

- forward, per chunk c: z_c = h_c @ W.T + b (n, V), lse_c = logsumexp(z_c), the loss terms
  lse - z[target] (and, with label smoothing eps, lse - mean_j z_j); z_c is dropped. Saved for
  backward: h, W, b, target and lse (N floats).
- backward, per chunk: z_c again, p = exp(z_c - lse_c), dz = scale * (p - (1 - eps) onehot -
  eps / V), then grad_h_c = dz @ W, grad_W += dz.T @ h_c, grad_b += sum(dz).

So the extra memory is one chunk of logits (and its gradient, in place), at the price of one
more matmul of the output projection (the logits are computed again in backward). Exact: the
same formulas as torch's cross_entropy (log-softmax through logsumexp, softmax minus the
target distribution), so fp32 gradients agree to rounding. `reduction` is 0 (none), 1 (mean),
2 (sum) as aten.cross_entropy_loss takes it; `ignore_index` rows contribute nothing (mean
divides by the rows kept); `upcast` is the dtype the logits are cast to before the loss (a
model's `logits.float()`), None for none. Class weights are not supported (the pass skips
such losses).
"""

from __future__ import annotations

import torch


def chunk_rows_for(n_rows: int, vocab: int, itemsize: int, chunk_bytes: int) -> int:
    """Rows per chunk so that one chunk of logits takes about `chunk_bytes` (at least 1)."""
    return max(1, min(n_rows, chunk_bytes // max(1, vocab * itemsize)))


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, reduction, ignore_index, label_smoothing, upcast, chunk):
        n, vocab = h.shape[0], weight.shape[0]
        lse = h.new_empty((n,), dtype=upcast or h.dtype)
        total = h.new_zeros((n,), dtype=upcast or h.dtype)
        valid = target != ignore_index
        for s in range(0, n, chunk):
            z = _logits(h[s:s + chunk], weight, bias, upcast)
            lse_c = torch.logsumexp(z, dim=-1)
            t = target[s:s + chunk]
            keep = valid[s:s + chunk]
            picked = z.gather(1, torch.where(keep, t, 0).unsqueeze(1)).squeeze(1)
            row = (1.0 - label_smoothing) * (lse_c - picked)
            if label_smoothing:
                row = row + label_smoothing * (lse_c - z.mean(dim=-1))
            total[s:s + chunk] = torch.where(keep, row, 0.0)
            lse[s:s + chunk] = lse_c
            del z
        ctx.save_for_backward(h, weight, bias if bias is not None else h.new_empty(0), target, lse)
        ctx.has_bias = bias is not None
        ctx.args = (reduction, ignore_index, label_smoothing, upcast, chunk, vocab)
        ctx.kept = valid.sum()
        if reduction == 0:
            return total
        if reduction == 2:
            return total.sum()
        return total.sum() / ctx.kept

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, target, lse = ctx.saved_tensors
        reduction, ignore_index, label_smoothing, upcast, chunk, vocab = ctx.args
        n = h.shape[0]
        valid = target != ignore_index
        if reduction == 0:
            scale = grad
        elif reduction == 2:
            scale = grad.expand(n)
        else:
            scale = (grad / ctx.kept).expand(n)
        scale = torch.where(valid, scale, 0.0)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias) if ctx.has_bias and ctx.needs_input_grad[2] else None
        for s in range(0, n, chunk):
            h_c = h[s:s + chunk]
            z = _logits(h_c, weight, bias if ctx.has_bias else None, upcast)
            dz = z.sub_(lse[s:s + chunk].unsqueeze(1)).exp_()           # softmax, in place
            t = torch.where(valid[s:s + chunk], target[s:s + chunk], 0)
            dz.scatter_add_(1, t.unsqueeze(1), dz.new_full((dz.shape[0], 1), -(1.0 - label_smoothing)))
            if label_smoothing:
                dz.sub_(label_smoothing / vocab)
            dz.mul_(scale[s:s + chunk].unsqueeze(1).to(dz.dtype))
            dz = dz.to(h.dtype)                                          # through the upcast, as autograd does
            if grad_h is not None:
                grad_h[s:s + chunk] = dz @ weight
            if grad_w is not None:
                grad_w.addmm_(dz.t(), h_c)
            if grad_b is not None:
                grad_b.add_(dz.sum(0))
            del z, dz
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _logits(h, weight, bias, upcast):
    z = torch.nn.functional.linear(h, weight, bias)
    return z.to(upcast) if upcast is not None else z


def chunked_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias, target: torch.Tensor,
                                 reduction: int = 1, ignore_index: int = -100, label_smoothing: float = 0.0,
                                 upcast: torch.dtype | None = None, chunk_rows: int = 1024) -> torch.Tensor:
    """cross_entropy(linear(h, weight, bias)[.to(upcast)], target) without the whole logits.

    h (..., D) is flattened to rows (N, D); target has N elements; weight (V, D); bias (V,) or
    None. Returns what aten.cross_entropy_loss returns for `reduction` (0 none: (N,), 1 mean,
    2 sum)."""
    if reduction not in (0, 1, 2):
        raise ValueError(f"reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction!r}")
    rows = h.reshape(-1, h.shape[-1])
    return _ChunkedLinearCE.apply(rows, weight, bias, target.reshape(-1), reduction, ignore_index,
                                  float(label_smoothing), upcast, max(1, int(chunk_rows)))
