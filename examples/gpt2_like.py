"""A GPT-2-like decoder with explicit attention (no scaled_dot_product_attention).

    memfit plan examples/gpt2_like.py:make
    memfit plan examples/gpt2_like.py:gpt2_small --static     # 12 layers, d=768, B=8, T=1024

Written out by hand so every op the passes see is visible: the attention matrix
(B, H, T, T) is materialized, masked, soft-maxed and dropped out, as in the original GPT-2
(Radford et al. 2019) and nanoGPT's non-flash path. `make()` is sized to run a real training
step on a laptop CPU in about a second.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, block_size: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)
        mask = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
        self.register_buffer("mask", mask.view(1, 1, block_size, block_size), persistent=False)

    def forward(self, x):  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
        att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, block_size: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, block_size, dropout)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d, dropout)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab). The LM head is tied to the token embedding."""

    def __init__(self, vocab: int = 2048, block_size: int = 256, layers: int = 4, d: int = 256,
                 heads: int = 4, dropout: float = 0.1):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(d, heads, block_size, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):  # (B, T) int64 -> (B, T, vocab)
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def loss_fn(logits):
    """Next-token cross-entropy against a fixed pseudo-target (the argmax-free stand-in for
    labels: token t+1 := (t * 7 + 3) mod vocab), so the loss needs no extra input."""
    B, T, V = logits.shape
    target = (torch.arange(T, device=logits.device) * 7 + 3) % V
    return F.cross_entropy(logits.reshape(B * T, V), target.repeat(B))


def make(batch_size: int = 4, seq_len: int = 128, layers: int = 4, d: int = 256, heads: int = 4,
         vocab: int = 2048, dropout: float = 0.1):
    """A small GPT (4 layers, d=256): model and example token ids (B, T)."""
    model = GPT(vocab=vocab, block_size=max(seq_len, 256), layers=layers, d=d, heads=heads, dropout=dropout)
    idx = torch.randint(0, vocab, (batch_size, seq_len))
    return model, (idx,)


def gpt2_small(batch_size: int = 8, seq_len: int = 1024, device: str = "meta"):
    """GPT-2-small dimensions (12 layers, d=768, 12 heads, vocab 50257). Built on the meta
    device by default: for planning only (no weights are allocated)."""
    with torch.device(device):
        model = GPT(vocab=50257, block_size=1024, layers=12, d=768, heads=12, dropout=0.1)
        idx = torch.randint(0, 50257, (batch_size, seq_len))
    return model, (idx,)
