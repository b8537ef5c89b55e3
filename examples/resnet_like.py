"""ResNet-like CNNs with BatchNorm (He et al. 2016): basic and bottleneck residual blocks.

    memfit plan examples/resnet_like.py:make
    memfit plan examples/resnet_like.py:resnet50_like -D freeze_bn=true

`freeze_bn=True` puts every BatchNorm in eval mode while the model trains: frozen
statistics, the transfer-learning case that Conv+BN tune mode (fuse-conv-bn) targets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, k, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, c, stride=1):
        super().__init__()
        self.conv1 = conv_bn(cin, c, 3, stride)
        self.conv2 = conv_bn(c, c, 3)
        self.down = conv_bn(cin, c, 1, stride) if stride != 1 or cin != c else None

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        return F.relu(self.conv2(F.relu(self.conv1(x))) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, c, stride=1):
        super().__init__()
        cout = c * 4
        self.conv1 = conv_bn(cin, c, 1)
        self.conv2 = conv_bn(c, c, 3, stride)
        self.conv3 = conv_bn(c, cout, 1)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.conv3(h) + idt)


class ResNet(nn.Module):
    """Images (B, 3, H, W) -> logits (B, classes)."""

    def __init__(self, block=BasicBlock, layers=(2, 2, 2, 2), width: int = 32, classes: int = 100):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], width
        for i, n in enumerate(layers):
            c = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, c, stride=2 if (j == 0 and i > 0) else 1))
                cin = c * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean(dim=(2, 3)))


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Put every BatchNorm in eval mode (frozen running statistics); affine stays trainable."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def loss_fn(logits):
    target = torch.arange(logits.shape[0], device=logits.device) % logits.shape[1]
    return F.cross_entropy(logits, target)


def make(batch_size: int = 8, image_size: int = 64, width: int = 32, freeze_bn: bool = False):
    """A ResNet-18-shaped network at width 32 on 64x64 images: model and images."""
    model = ResNet(BasicBlock, (2, 2, 2, 2), width=width)
    model.train()
    if freeze_bn:
        freeze_batchnorm(model)
    return model, (torch.randn(batch_size, 3, image_size, image_size),)


def resnet50_like(batch_size: int = 8, image_size: int = 128, width: int = 64, freeze_bn: bool = False):
    """ResNet-50 layout (bottleneck blocks 3-4-6-3, width 64, 1000 classes)."""
    model = ResNet(Bottleneck, (3, 4, 6, 3), width=width, classes=1000)
    model.train()
    if freeze_bn:
        freeze_batchnorm(model)
    return model, (torch.randn(batch_size, 3, image_size, image_size),)
