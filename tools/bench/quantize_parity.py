"""Training parity of 8-bit saved activations: a character-level language model trained on
the repository's own text (README, docs, memfit sources), unquantized against
quantize-activations at 8 bits (and 4 bits for reference), same seed, same batches.

    python tools/bench/quantize_parity.py [--steps 120] [--png docs/quantization_parity.png]

Prints the final held-out loss of each run and their ratio; writes the curves as a PNG.
tests/test_quantize_parity.py runs a shorter version and asserts the 2% margin.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import common  # first: puts the repository root on sys.path


def corpus() -> str:
    """The repository's text, in a fixed order."""
    files = [os.path.join(common.ROOT, "README.md")] + sorted(glob.glob(os.path.join(common.ROOT, "docs", "*.md")))
    files += sorted(glob.glob(os.path.join(common.ROOT, "memfit", "**", "*.py"), recursive=True))
    parts = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            parts.append(fh.read())
    return "\n".join(parts)


class CharLM(nn.Module):
    """A 2-layer pre-LN transformer over characters with explicit attention; (B, T) -> (B, T, V)."""

    def __init__(self, vocab: int, d: int = 64, heads: int = 4, layers: int = 2, block: int = 64):
        super().__init__()
        self.heads = heads
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(block, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)), persistent=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x, self.mask[:T, :T])
        return self.head(self.ln(x))


class _Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        att = (q @ k.transpose(-2, -1)) * (D // self.heads) ** -0.5
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


def train(bits: int | None, steps: int = 150, seed: int = 0, batch: int = 16, block: int = 64,
          lr: float = 3e-3, eval_every: int = 10, text: str | None = None, d: int = 64,
          layers: int = 2, min_bytes: int = 4096) -> dict:
    """Train CharLM; bits=None: unquantized, else quantize-activations at `bits` (graph pass).

    Returns {"train": [loss per step], "eval": [(step, held-out loss)], "seconds": wall}.
    """
    from memfit.ir.capture import capture
    from memfit.passes import PassContext
    from memfit.passes.quantize import QuantizeActivations

    text = text if text is not None else corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]
    torch.manual_seed(seed)
    model = CharLM(len(chars), d=d, layers=layers, block=block)
    gen = torch.Generator().manual_seed(seed + 1)

    def get(d, g):
        ix = torch.randint(0, len(d) - block - 1, (batch,), generator=g)
        return torch.stack([d[i:i + block] for i in ix]), torch.stack([d[i + 1:i + block + 1] for i in ix])

    vgen = torch.Generator().manual_seed(1234)
    val_batches = [get(val_data, vgen) for _ in range(4)]
    x0, _ = get(train_data, torch.Generator().manual_seed(99))
    cap = capture(model, (x0,), dynamic=False)
    run = cap.gm
    if bits is not None:
        run = QuantizeActivations(bits=bits, stochastic=bits < 8, min_bytes=min_bytes).run(cap.gm, PassContext(captured=cap)).gm
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    V = len(chars)

    def loss_of(xb, yb, fwd):
        return F.cross_entropy(fwd(xb).reshape(-1, V), yb.reshape(-1))

    def evaluate():
        with torch.no_grad():
            return sum(loss_of(xb, yb, model).item() for xb, yb in val_batches) / len(val_batches)

    out = {"train": [], "eval": [], "bits": bits}
    t0 = time.perf_counter()
    for step in range(steps):
        xb, yb = get(train_data, gen)
        loss = loss_of(xb, yb, lambda t: run(t)[0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out["train"].append(loss.item())
        if (step + 1) % eval_every == 0 or step == steps - 1:
            out["eval"].append((step + 1, evaluate()))
    out["seconds"] = time.perf_counter() - t0
    return out


def plot(runs: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in runs:
        label = "unquantized" if r["bits"] is None else f"{r['bits']}-bit saved activations"
        tr = r["train"]
        k = 5
        smooth = [sum(tr[max(0, i - k + 1):i + 1]) / len(tr[max(0, i - k + 1):i + 1]) for i in range(len(tr))]
        ax[0].plot(range(1, len(tr) + 1), smooth, label=label)
        ax[1].plot([s for s, _ in r["eval"]], [v for _, v in r["eval"]], marker="o", ms=3, label=label)
    ax[0].set_title("training loss (5-step mean)")
    ax[1].set_title("held-out loss")
    for a in ax:
        a.set_xlabel("step")
        a.set_ylabel("cross-entropy (nats/char)")
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle("Character LM on the repository's text: quantize-activations vs unquantized (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default=os.path.join(common.ROOT, "docs", "quantization_parity.png"))
    ap.add_argument("--bits", default="8,4")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    kw = dict(batch=args.batch, block=args.block, d=args.d, lr=args.lr, min_bytes=1024)
    runs = [train(None, args.steps, args.seed, **kw)]
    for b in [int(s) for s in args.bits.split(",") if s]:
        runs.append(train(b, args.steps, args.seed, **kw))
    base = runs[0]["eval"][-1][1]
    print(f"steps {args.steps}, seed {args.seed}, chars {len(corpus())}")
    for r in runs:
        name = "fp32" if r["bits"] is None else f"{r['bits']}-bit"
        final = r["eval"][-1][1]
        print(f"{name:>6}: final held-out loss {final:.4f} (x{final / base:.4f} of unquantized), "
              f"final train loss {r['train'][-1]:.4f}, {r['seconds']:.1f} s")
    plot(runs, args.png)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
