"""A small ViT (pre-LN blocks, explicit attention, class token) for the token-merging tests
and benchmark; the same layout as examples/vit_like.py, with optional distillation token
(DeiT-like, Touvron et al. 2021) and blocks in a ModuleList iterated by the parent."""

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, d, heads, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.scale = (d // heads) ** -0.5
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.attn_drop = nn.Dropout(dropout)

    def forward(self, x):  # (B, N, D) -> (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * self.scale
        att = self.attn_drop(att.softmax(dim=-1))
        return self.proj((att @ v).transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, d, heads, mlp_ratio=4, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_ratio * d, d))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallViT(nn.Module):
    """Images (B, C, H, W) -> logits (B, classes); `distill` adds DeiT's distillation token
    (its head is averaged with the class token's); `dense` returns per-token features."""

    def __init__(self, image_size=32, patch=4, channels=3, classes=10, layers=4, d=32, heads=4,
                 distill=False, dense=False, dropout=0.0):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, d, patch, stride=patch)
        n = (image_size // patch) ** 2
        self.extra = 2 if distill else 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        if distill:
            self.distillation_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + self.extra, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, dropout=dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.dense = dense

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        special = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.extra == 2:
            special.append(self.distillation_token.expand(x.shape[0], -1, -1))
        x = torch.cat(special + [x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.dense:
            return self.head(x)  # (B, N, classes): a per-token (segmentation-style) head
        if self.extra == 2:
            return (self.head(x[:, 0]) + self.head(x[:, 1])) / 2
        return self.head(x[:, 0])
