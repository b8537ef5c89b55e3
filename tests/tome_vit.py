"""A small ViT (pre-LN blocks, explicit attention, class token) for the token-merging tests
and benchmark: the blocks of examples/vit_like.py, with an optional distillation token
(DeiT-like, Touvron et al. 2021) and blocks in a ModuleList iterated by the parent."""

import torch
from torch import nn

from examples.vit_like import Attention, Block  # noqa: F401 - the same blocks as the example


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
        self.blocks = nn.ModuleList(Block(d, heads, 4, dropout) for _ in range(layers))
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
