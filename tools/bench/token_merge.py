"""Token merging (ToMe) against r: measured memory, throughput and accuracy.

    PYTHONPATH=. python tools/bench/token_merge.py            # both parts
    (on the shared 2-core machine: speed part about 2 minutes, accuracy part about 8; use
    --epochs 8 --ft-epochs 1 for a quicker, less trained run)
    PYTHONPATH=. python tools/bench/token_merge.py --part speed
    PYTHONPATH=. python tools/bench/token_merge.py --part accuracy

Part 1 (speed): a small ViT (tests/tome_vit.py: 32x32 images, 2x2 patches, 257 tokens, 4
blocks, d=64), batch 8. For each r: memfit.measure (saved activation bytes and step peak of
one AdamW training step, CPU allocator events) and images/s of a training step (forward +
backward) and of inference, medians over rounds that alternate the variants in one process.

Part 2 (accuracy): scikit-learn's digits (1,797 8x8 images shipped with the package; 1,347
train / 450 test) upsampled to 16x16 in 2x2 patches (64 tokens + class token), a 4-block ViT
(d=32) trained briefly
without merging, then evaluated with merging at each r, off the shelf and after a short
fine-tune with merging on. Needs `pip install scikit-learn`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import common  # first: puts the repository root on sys.path
from memfit.cost_models.measure import measure
from memfit.rewrites.token_merge import apply_token_merging, model_tokens_per_layer
from tests.tome_vit import SmallViT


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def speed(rs=(0, 8, 16, 32), rounds=3, batch=8):
    torch.manual_seed(0)
    base = SmallViT(image_size=32, patch=2, channels=3, classes=10, layers=4, d=64, heads=4).train()
    x = torch.randn(batch, 3, 32, 32)
    variants = {f"r={r}": apply_token_merging(base, r) for r in rs}
    variants["r=8 decreasing"] = apply_token_merging(base, 8, schedule="decreasing")
    variants["baseline (no rewrite)"] = base

    def loss_fn(out):
        return F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])

    rows = {}
    for name, m in variants.items():
        meas = measure(m, example_inputs=(x,), optimizer="adamw", loss_fn=loss_fn)
        tokens = model_tokens_per_layer(m, x) if name != "baseline (no rewrite)" else None
        rows[name] = {"saved": meas.saved_activations, "peak": meas.peak_bytes, "tokens": tokens,
                      "train": [], "infer": []}
    for _ in range(rounds):
        for name, m in variants.items():
            rows[name]["train"].append(batch / common.step_time(m, (x,), loss_fn))
            with torch.no_grad():
                t0 = time.perf_counter()
                m(x)
                rows[name]["infer"].append(batch / (time.perf_counter() - t0))
    ref = rows["r=0"]
    ref_train, ref_infer = statistics.median(ref["train"]), statistics.median(ref["infer"])
    print(f"\nSmall ViT (257 tokens, 4 blocks, d=64), batch {batch}, AdamW step; medians of {rounds} rounds")
    print(common.table(["variant", "tokens per block (in, last out)", "saved activations MiB", "x r=0",
                        "step peak MiB", "x r=0", "train img/s", "x r=0", "inference img/s", "x r=0"]))
    for name, row in rows.items():
        tr, inf = statistics.median(row["train"]), statistics.median(row["infer"])
        tok = "-" if row["tokens"] is None else f"{row['tokens'][0]} .. {row['tokens'][-1]}"
        print(common.row([name, tok, _mib(row["saved"]), f"{row['saved'] / ref['saved']:.2f}", _mib(row["peak"]),
                          f"{row['peak'] / ref['peak']:.2f}", f"{tr:.0f}", f"{tr / ref_train:.2f}", f"{inf:.0f}",
                          f"{inf / ref_infer:.2f}"]))


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("the accuracy part needs scikit-learn: pip install scikit-learn")
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    # 16x16 (bilinear) in 2x2 patches: 64 tokens of 4 pixels each; 1x1 patches of the 8x8
    # images learned much slower (chance level after 60 steps, 37% here after 100)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    x = (x - x[:1347].mean()) / x[:1347].std()
    return (x[:1347], y[:1347]), (x[1347:], y[1347:])


def _train(model, data, epochs, lr, seed=0):
    xs, ys = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(ys) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(ys), generator=g)
        for i in range(0, len(ys), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


@torch.no_grad()
def _accuracy(model, data) -> float:
    xs, ys = data
    model.eval()
    return (model(xs).argmax(-1) == ys).float().mean().item()


def accuracy(rs=(0, 4, 8, 16, 32), epochs=20, ft_epochs=2):
    import copy

    t0 = time.perf_counter()
    train, test = _digits()
    torch.manual_seed(0)
    base = SmallViT(image_size=16, patch=2, channels=1, classes=10, layers=4, d=32, heads=4)
    # a small convolutional stem before the 2x2 patchify (Xiao et al. 2021, "Early convolutions
    # help transformers see better"): 64% after 5 epochs here against 59% after 8 without
    base.patch_embed = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.GELU(),
                                           torch.nn.Conv2d(32, 32, 2, stride=2))
    _train(base, train, epochs, lr=4e-3)
    t_train = time.perf_counter() - t0
    print(f"\nscikit-learn digits, 4-block ViT (d=32, 65 tokens, conv stem), trained {epochs} epochs without merging "
          f"({t_train:.0f} s); fine-tune: {ft_epochs} epochs with merging, lr 5e-4")
    print(common.table(["r per block", "tokens per block (in, last out)", "test accuracy, no fine-tune",
                        "after fine-tune"]))
    for r in rs:
        m = apply_token_merging(base, r)
        tokens = model_tokens_per_layer(m, test[0][:2])
        acc = _accuracy(m, test)
        ft_base = copy.deepcopy(base)
        ft = apply_token_merging(ft_base, r)
        _train(ft, train, ft_epochs, lr=5e-4, seed=1)
        acc_ft = _accuracy(ft, test)
        print(common.row([r, " ".join(map(str, tokens)), f"{acc * 100:.1f}%", f"{acc_ft * 100:.1f}%"]))
    m = apply_token_merging(base, 8, prop_attn=False)
    print(common.row(["8, no proportional attention", "-", f"{_accuracy(m, test) * 100:.1f}%", "-"]))
    print(f"(accuracy part: {time.perf_counter() - t0:.0f} s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["speed", "accuracy", "all"], default="all")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine more threads oversubscribe)")
    p.add_argument("--epochs", type=int, default=20, help="training epochs without merging (accuracy part)")
    p.add_argument("--ft-epochs", type=int, default=2, help="fine-tuning epochs with merging (accuracy part)")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (speed part)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(common.machine())
    if args.part in ("speed", "all"):
        speed(rounds=args.rounds)
    if args.part in ("accuracy", "all"):
        accuracy(epochs=args.epochs, ft_epochs=args.ft_epochs)


if __name__ == "__main__":
    main()
