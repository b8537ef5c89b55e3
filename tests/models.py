"""Small hand-written models for unit tests (the examples/ folder holds the bigger ones)."""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=64, hidden=256, d_out=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):  # (B, d_in) -> (B, d_out)
        return self.fc3(torch.nn.functional.gelu(self.fc2(torch.relu(self.fc1(x)))))


class ConvBN(nn.Module):
    """A small CNN with BatchNorm and a residual add."""

    def __init__(self, c=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):  # (B, 3, H, W) -> (B, classes)
        h = self.stem(x)
        h = torch.relu(h + self.body(h))
        return self.head(h.mean(dim=(2, 3)))


class Block(nn.Module):
    """One pre-LN transformer block with explicit attention; (B, T, D) -> (B, T, D)."""

    def __init__(self, d=64, heads=4, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5
        att = self.drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class BlockStack(nn.Module):
    """`n` transformer Blocks in a ModuleList and a linear head (the reversible pass's case)."""

    def __init__(self, n=4, d=16):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, 2) for _ in range(n)])
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class ResBlock(nn.Module):
    """conv-bn-relu-conv with a residual connection (shape-preserving)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class Down(nn.Module):
    """Stride-2 convolution doubling the channels (changes the shape)."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class ConvNet(nn.Module):
    """A stem, `before` ResBlocks, a Down block, `after` ResBlocks at twice the channels and
    a linear head on the pooled features (the reversible pass's convolutional case)."""

    def __init__(self, c=4, before=2, after=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.layers = nn.ModuleList([*(ResBlock(c) for _ in range(before)), Down(c),
                                     *(ResBlock(2 * c) for _ in range(after))])
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=(2, 3)))


def gelu_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear-GELU-Linear-GELU-Linear, seeded (the optimizer tests' model)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, d_out))


def ce(out, y):
    return torch.nn.functional.cross_entropy(out, y)


def decay_groups(model):
    """Two parameter groups as training loops write them: weights decayed, the rest not, at
    their own learning rate."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}]
