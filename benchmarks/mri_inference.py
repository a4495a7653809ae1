"""MRI patch nets: dense vs per-voxel inference speed, and Dice of a short training, side by side.

1. Throughput per net (as configured in conf/model/): voxels/s of dense tiled inference over a
   volume vs the naive loop (one patch per voxel through ``forward``) on sampled voxels, and the
   largest probability difference between the two on those voxels (they must agree).
2. A short training of each net on the BraTS train cases (``train(cfg)``, untracked), then dense
   inference on the validation cases: Dice / sensitivity per region before and after the
   shape-aware clean-up, for each net and for their ensemble (probabilities averaged), plus the
   whole-tumour 95 % Hausdorff distance. A per-case table goes to ``--out``.

    .venv/bin/python benchmarks/mri_inference.py --threads 2          # ~15 minutes on 2 idle cores
    .venv/bin/python benchmarks/mri_inference.py --smoke-test         # phantoms, ~1 minute
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from hydra.utils import instantiate

from deconvlab.config import compose_config
from deconvlab.inference import (
    clean_up,
    dense_probabilities,
    hausdorff95,
    per_voxel_probabilities,
    region_metrics,
)
from deconvlab.train import build_task, train

EXPERIMENTS = {"deepmedic": "deepmedic_p9_ctx3", "twopath_cnn": "twopath_cnn_p33_2p5d"}
SCAN_VOXELS = 500 * 500 * 250  # the lecture's clinical volume


def throughput(model: nn.Module, image: np.ndarray, samples: int, tile: int) -> dict[str, float]:
    """Dense vs per-voxel voxels/s on ``image`` (a sub-volume), and their largest disagreement."""
    start = time.perf_counter()
    dense = dense_probabilities(model, image, tile=tile)
    dense_rate = image[0].size / (time.perf_counter() - start)
    rng = np.random.default_rng(0)
    centres = np.stack([rng.integers(0, n, samples) for n in image.shape[1:]], axis=1)
    start = time.perf_counter()
    naive = per_voxel_probabilities(model, image, centres)
    naive_rate = samples / (time.perf_counter() - start)
    difference = float(np.abs(dense[(slice(None), *centres.T)].T - naive).max())
    return {"dense_vox_s": dense_rate, "per_voxel_vox_s": naive_rate, "ratio": dense_rate / naive_rate,
            "max_prob_diff": difference}


def train_net(experiment: str, overrides: list[str]) -> tuple[nn.Module, object, float]:
    cfg = compose_config([f"experiment={experiment}", "logger=none", "trainer.accelerator=cpu",
                          "trainer.enable_progress_bar=false", *overrides])
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    task = build_task(cfg)
    task.load_state_dict(torch.load(result.best_checkpoint, weights_only=True)["state_dict"])
    datamodule = instantiate(cfg.data)
    return task.model.eval(), datamodule, seconds


def evaluate(nets: dict[str, nn.Module], cases, tile: int) -> list[dict]:
    """Per case: each net, then their ensemble (mean of the nets' probabilities, computed once)."""
    rows = []
    for case in cases:
        probabilities, seconds = {}, {}
        for name, net in nets.items():
            start = time.perf_counter()
            probabilities[name] = dense_probabilities(net, case.image, tile=tile, mask=case.brain)
            seconds[name] = time.perf_counter() - start
        probabilities["ensemble"] = np.mean(list(probabilities.values()), axis=0)
        seconds["ensemble"] = sum(seconds.values())
        for name, probs in probabilities.items():
            label = probs.argmax(0)
            for stage, prediction in (("raw", label), ("cleaned", clean_up(label, case.brain))):
                metrics = region_metrics(prediction, case.label)
                metrics["hd95_whole"] = hausdorff95(prediction > 0, case.label > 0)
                rounded = {k: round(v, 4) for k, v in metrics.items()}
                rows.append({"case": case.name, "net": name, "stage": stage,
                             "seconds": round(seconds[name], 1), **rounded})
    return rows


def print_table(rows: list[dict], keys: list[str]) -> None:
    print(" | ".join(f"{k:>16}" for k in keys))
    for row in rows:
        print(" | ".join(f"{row[k]:>16.4g}" if isinstance(row[k], float) else f"{row[k]:>16}" for k in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="phantoms, tiny training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=6, help="DeepMedic epochs")
    parser.add_argument("--samples", type=int, default=8192, help="DeepMedic training patches per epoch")
    # A 33x33 TwoPathCNN patch costs ~10x a DeepMedic patch on CPU: a smaller budget for the same wall time.
    parser.add_argument("--epochs-2d", type=int, default=3, help="TwoPathCNN epochs")
    parser.add_argument("--samples-2d", type=int, default=4096, help="TwoPathCNN patches per epoch")
    parser.add_argument("--tile", type=int, default=48)
    parser.add_argument("--out", default="outputs/benchmarks/mri_inference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suffix = "phantom" if args.smoke_test else "brats"
    budgets = {"deepmedic": (args.epochs, args.samples), "twopath_cnn": (args.epochs_2d, args.samples_2d)}
    trained, datamodule = {}, None
    for short, experiment in EXPERIMENTS.items():
        epochs, samples = (2, 512) if args.smoke_test else budgets[short]
        overrides = [f"trainer.max_epochs={epochs}", f"data.samples_per_epoch={samples}",
                     "data.eval_samples=2048", f"paths.output_dir={args.out}/runs/${{name}}"]
        model, datamodule, seconds = train_net(f"{experiment}_{suffix}", overrides)
        trained[short] = model
        print(f"trained {experiment}_{suffix}: {epochs} epochs x {samples} patches in {seconds:.0f} s")
    cases = datamodule.cases("val")

    print(f"\n== throughput ({args.threads} thread(s), tile {args.tile}); naive = one patch per voxel ==")
    image = cases[0].image[:, :48, :48, :48] if not args.smoke_test else cases[0].image[:, :24, :24, :24]
    voxels = 256 if args.smoke_test else 1024
    speed = {name: throughput(net, image, voxels, args.tile) for name, net in trained.items()}
    for name, row in speed.items():
        print(f"{name:>12}: dense {row['dense_vox_s']:9.0f} vox/s | "
              f"per-voxel {row['per_voxel_vox_s']:7.0f} vox/s | "
              f"x{row['ratio']:.0f} | max |p_dense - p_voxel| {row['max_prob_diff']:.1e} | "
              f"500x500x250 at this rate: {SCAN_VOXELS / row['dense_vox_s'] / 60:.0f} min")

    print("\n== validation cases: dense inference, Dice before/after clean-up ==")
    rows = evaluate(trained, cases, args.tile)
    print_table(rows, ["case", "net", "stage", "dice_whole", "dice_core", "dice_enhancing", "hd95_whole",
                       "seconds"])
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process: {peak_gib:.2f} GiB")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_case.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "throughput.json").write_text(json.dumps(speed, indent=2))


if __name__ == "__main__":
    main()
