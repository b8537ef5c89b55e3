"""Attention runtime helpers the sdpa-attention pass calls into."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sdpa_with_dropout_module(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, dropout: nn.Module,
                             is_causal: bool, scale: float) -> torch.Tensor:
    """scaled_dot_product_attention whose dropout follows an nn.Dropout module at call time.

    q: (..., L, E), k: (..., S, E), v: (..., S, Ev) -> (..., L, Ev). The probability is
    `dropout.p` while the module is in training mode and 0 otherwise, as nn.Dropout would
    apply it; the masks come from SDPA's own random draws (equal in distribution only).
    """
    p = float(dropout.p) if dropout.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal,
                                          scale=scale)
