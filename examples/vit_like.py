"""A ViT-like image classifier (Dosovitskiy et al. 2021) with explicit attention.

    memfit plan examples/vit_like.py:make

Patch embedding by a strided convolution, a class token, pre-LN transformer blocks
(attention and MLP sublayers), classification from the class token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = (d // heads) ** -0.5
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, hd)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N)
        att = self.attn_drop(att.softmax(dim=-1))
        return self.proj((att @ v).transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Images (B, C, H, W) -> class logits (B, classes)."""

    def __init__(self, image_size: int = 64, patch: int = 8, channels: int = 3, classes: int = 100,
                 layers: int = 4, d: int = 192, heads: int = 3, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, d, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def loss_fn(logits):
    """Cross-entropy against fixed pseudo-labels (class b mod classes for sample b)."""
    target = torch.arange(logits.shape[0], device=logits.device) % logits.shape[1]
    return F.cross_entropy(logits, target)


def make(batch_size: int = 8, image_size: int = 64, layers: int = 4, d: int = 192, heads: int = 3,
         dropout: float = 0.0):
    """A small ViT (4 layers, d=192, 8x8 patches of 64x64 images): model and images."""
    model = ViT(image_size=image_size, layers=layers, d=d, heads=heads, dropout=dropout)
    return model, (torch.randn(batch_size, 3, image_size, image_size),)


def vit_base(batch_size: int = 32, device: str = "meta"):
    """ViT-B/16 dimensions (12 layers, d=768, 224x224 images) on the meta device, for planning."""
    with torch.device(device):
        model = ViT(image_size=224, patch=16, classes=1000, layers=12, d=768, heads=12)
        x = torch.randn(batch_size, 3, 224, 224)
    return model, (x,)
