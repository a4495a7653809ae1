"""MRI patch nets: dense vs per-voxel inference speed, a clinical-size volume, and Dice after a short training.

1. ``throughput`` (default): per net (as configured in conf/model/, untrained: speed does not depend on
   the weights), voxels/s of dense tiled inference over a sub-volume vs the naive loop (one patch per
   voxel through ``forward``, patches cut the cheapest way) on sampled voxels, their ratio, and the
   largest probability difference between the two on those voxels (they must agree).
2. ``--scan``: the time and peak memory to label a 500x500x250 volume (62.5M voxels, every voxel inside
   the "brain", so no tile is skipped: the worst case) with one net's dense inference; ``--scan-block D H W``
   labels a block of it instead and extrapolates the time to the whole volume by the number of tiles
   (every tile costs the same, edge tiles included; memory is measured on the block, not extrapolated).
4. ``--cost``: per net, the multiply-accumulates per labelled voxel of one training input (a patch labels
   its centre voxel, a segment its block) and of dense inference (a 48^3 tile), and the measured time
   of a training step (forward + backward, batch ``--cost-batch``) per labelled voxel.
3. ``--dice``: a short training of each net on the BraTS train cases (``train(cfg)``, untracked), then
   dense inference on the validation cases: Dice / sensitivity / HD95 per region before and after the
   shape-aware clean-up, for each net and their ensemble. A per-case table goes to ``--out``.

    .venv/bin/python benchmarks/volume_inference.py --threads 1                  # throughput, ~2 minutes
    nice .venv/bin/python benchmarks/volume_inference.py --scan --threads 2 --nets deepmedic  # ~5-10 min
    .venv/bin/python benchmarks/volume_inference.py --dice --threads 2           # ~20 minutes on 2 idle cores
    .venv/bin/python benchmarks/volume_inference.py --smoke-test                 # phantoms, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from hydra.utils import instantiate

from deconvlab.build import build_task
from deconvlab.config import compose_config
from deconvlab.data.brats import BRATS_REGIONS, BratsDataModule
from deconvlab.train import train
from deconvlab.volume.dense import dense_probabilities, per_voxel_probabilities
from deconvlab.volume.report import evaluate_cases, write_table

NETS = ("deepmedic", "cascade_deepmedic", "twopath_cnn_2p5d")
SCAN_SHAPE = (500, 500, 250)  # the lecture's clinical volume
# Naive per-voxel patches per net: a cascade patch runs its first net over the second's whole patch.
NAIVE_SAMPLES = {"deepmedic": 1024, "cascade_deepmedic": 128, "twopath_cnn_2p5d": 512}


def build_net(model: str, data_root: str | None) -> nn.Module:
    cfg = compose_config(["experiment=patchnets_brats", f"model={model}", f"data.root={data_root or 'null'}"])
    return instantiate(cfg.model).eval()


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


def _tiles(shape: tuple[int, ...], tile: int, dims: int) -> int:
    """Tiles dense inference runs over ``shape`` (see volume.dense: 2-D nets run 2*tile x 2*tile x 8)."""
    sizes = [tile] * 3 if dims == 3 else [2 * tile, 2 * tile, 8]
    return int(np.prod([-(-n // min(t, n)) for n, t in zip(shape, sizes, strict=True)]))


def scan(model: nn.Module, tile: int, seed: int = 0, block: tuple[int, ...] | None = None) -> dict[str, float]:
    """Label a synthetic 500x500x250 two-modality volume (or a ``block`` of it, the time extrapolated to the
    whole volume by its number of tiles); wall time and the process's peak RSS."""
    shape = tuple(block) if block else SCAN_SHAPE
    image = np.random.default_rng(seed).standard_normal((2, *shape), dtype=np.float32)
    start = time.perf_counter()
    labels = dense_probabilities(model, image, tile=tile).argmax(0).astype(np.uint8)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    whole = seconds * _tiles(SCAN_SHAPE, tile, model.dims) / _tiles(shape, tile, model.dims)
    return {"voxels": float(labels.size), "seconds": seconds, "minutes": whole / 60,
            "extrapolated": shape != SCAN_SHAPE, "vox_s": labels.size / seconds, "peak_rss_gib": peak_gib}


class Dense(nn.Module):
    """A net's ``dense_logits`` as its forward (what ``count_macs`` runs)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.dense_logits(x)


def training_cost(model: nn.Module, modalities: int, batch: int) -> dict[str, float]:
    """MACs per labelled voxel of a training input and of dense inference; a training step's seconds per
    labelled voxel (forward + backward on random data: speed is content-blind)."""
    from deconvlab.data.patches import geometry_of
    from deconvlab.macs import count_macs

    geometry = geometry_of(model, modalities)
    if geometry.patch_dims == 2:
        shape = (geometry.channels(modalities), geometry.side, geometry.side)
    else:
        shape = (geometry.channels(modalities), *(geometry.side,) * 3)
    example = torch.randn(batch, *shape)
    labelled = batch * geometry.label_size ** 3
    train_macs = count_macs(model.eval(), example[:1]) * batch / labelled
    side = 48 + 2 * model.margin
    tile = torch.randn(1, model.in_channels, *(side,) * model.dims)  # full-resolution modalities
    dense_macs = count_macs(Dense(model), tile) / 48 ** model.dims
    model.train()
    seconds = []
    for _ in range(3):  # the first step warms up
        start = time.perf_counter()
        model(example).float().square().mean().backward()
        seconds.append(time.perf_counter() - start)
    step = float(np.median(seconds[1:]))
    return {"labelled_per_input": geometry.label_size ** 3, "train_macs_per_voxel": train_macs,
            "dense_macs_per_voxel": dense_macs, "train_step_s": step, "train_us_per_voxel": 1e6 * step / labelled}


def train_net(experiment: str, overrides: list[str]) -> tuple[nn.Module, object, float]:
    cfg = compose_config([f"experiment={experiment}", "logger=none", "trainer.accelerator=cpu",
                          "trainer.enable_progress_bar=false", "task.volume_eval=never", *overrides])
    start = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - start
    task = build_task(cfg)
    task.load_state_dict(torch.load(result.best_checkpoint, weights_only=True)["state_dict"])
    return task.model.eval(), instantiate(cfg.data), seconds


def dice(args: argparse.Namespace) -> list[dict]:
    """Train each net briefly, then per case: each net, then their ensemble (probabilities averaged)."""
    suffix = "phantom" if args.smoke_test else "brats"
    experiments = {"deepmedic": "deepmedic_p9_ctx3", "twopath_cnn": "twopath_cnn_p33_2p5d",
                   "cascade_deepmedic": "cascade_deepmedic_p35"}
    budgets = {"deepmedic": (args.epochs, args.samples), "twopath_cnn": (args.epochs_2d, args.samples_2d),
               "cascade_deepmedic": (args.epochs_cascade, args.samples_cascade)}
    trained, datamodule = {}, None
    for short in args.dice_nets:
        epochs, samples = (2, 512) if args.smoke_test else budgets[short]
        overrides = [f"trainer.max_epochs={epochs}", f"data.samples_per_epoch={samples}",
                     "data.eval_samples=2048", f"paths.output_dir={args.out}/runs/${{name}}"]
        trained[short], datamodule, seconds = train_net(f"{experiments[short]}_{suffix}", overrides)
        print(f"trained {experiments[short]}_{suffix}: {epochs} epochs x {samples} patches in {seconds:.0f} s")
    cases = datamodule.cases("val")
    clean = {"keep_fraction": 0.1, "fill_holes": True, "smooth_radius": 1}
    crf = {"weight": 1.0, "sigma": 1.0, "iterations": 3}
    rows = []
    groups = {k: [v] for k, v in trained.items()}
    if len(trained) > 1:
        groups["ensemble"] = list(trained.values())
    for name, nets in groups.items():
        # BraTS cases, or phantoms drawn with BraTS labels (--smoke-test).
        table, _ = evaluate_cases(nets, cases, BRATS_REGIONS, tile=args.tile, clean=clean, crf=crf)
        rows += [{"net": name, **row} for row in table]
    return rows


def print_table(rows: list[dict], keys: list[str]) -> None:
    print(" | ".join(f"{k:>16}" for k in keys))
    for row in rows:
        print(" | ".join(f"{row[k]:>16.4g}" if isinstance(row[k], float) else f"{row[k]:>16}" for k in keys))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke-test", action="store_true", help="phantoms, small volumes, tiny training")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nets", nargs="+", default=list(NETS), help="model configs timed")
    parser.add_argument("--side", type=int, default=96,
                        help="sub-volume side of the throughput figure (a multiple of --tile: no part-empty tiles)")
    parser.add_argument("--tile", type=int, default=48, help="dense output tile side")
    parser.add_argument("--scan", action="store_true", help="label a 500x500x250 volume (first of --nets)")
    parser.add_argument("--scan-block", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="label a block of the volume and extrapolate the time by the tile count")
    parser.add_argument("--cost", action="store_true", help="MACs and training time per labelled voxel")
    parser.add_argument("--cost-batch", type=int, default=8, help="training inputs per step of --cost")
    parser.add_argument("--dice", action="store_true", help="short BraTS training, then volume Dice")
    parser.add_argument("--dice-nets", nargs="+", default=["deepmedic", "twopath_cnn"],
                        choices=["deepmedic", "twopath_cnn", "cascade_deepmedic"])
    parser.add_argument("--epochs", type=int, default=6, help="DeepMedic epochs")
    parser.add_argument("--samples", type=int, default=8192, help="DeepMedic training patches per epoch")
    # A 33x33 TwoPathCNN patch costs ~10x a DeepMedic patch on CPU: a smaller budget for the same wall time.
    parser.add_argument("--epochs-2d", type=int, default=3, help="TwoPathCNN epochs")
    parser.add_argument("--samples-2d", type=int, default=4096, help="TwoPathCNN patches per epoch")
    parser.add_argument("--epochs-cascade", type=int, default=4, help="cascade epochs")
    parser.add_argument("--samples-cascade", type=int, default=4096, help="cascade patches per epoch")
    parser.add_argument("--data-root", default=None, help="BraTS root for the throughput sub-volume")
    parser.add_argument("--out", default="outputs/benchmarks/volume_inference")
    return parser.parse_args()


def sub_volume(args: argparse.Namespace) -> np.ndarray:
    """A real BraTS sub-volume when ``--data-root`` is given, else a phantom (speed is content-blind)."""
    side = 24 if args.smoke_test else args.side
    module = BratsDataModule(root=args.data_root, phantom_cases=1, phantom_size=max(side, 32))
    image = module.cases("val")[0].image
    return np.ascontiguousarray(image[:, :side, :side, :side])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.scan:
        figure = scan(build_net(args.nets[0], None), args.tile, block=args.scan_block)
        how = f"extrapolated from {figure['voxels']:.0f} voxels" if figure["extrapolated"] else "measured"
        print(f"== {args.nets[0]}: {SCAN_SHAPE} in {figure['minutes']:.1f} min ({how}; {figure['vox_s']:.0f} vox/s), "
              f"peak RSS {figure['peak_rss_gib']:.2f} GiB, {args.threads} thread(s), tile {args.tile} ==")
        (out / f"scan_{args.nets[0]}.json").write_text(json.dumps(figure, indent=2))
        return
    if args.cost:
        costs = {}
        for name in args.nets:
            costs[name] = row = training_cost(build_net(name, None), 2, args.cost_batch)
            print(f"{name:>26}: {row['labelled_per_input']:4d} voxels/input | "
                  f"train {row['train_macs_per_voxel'] / 1e6:8.2f} MMAC/voxel, "
                  f"{row['train_us_per_voxel']:8.1f} us/voxel (step {row['train_step_s']:.2f} s) | "
                  f"dense {row['dense_macs_per_voxel'] / 1e6:6.3f} MMAC/voxel", flush=True)
        (out / "cost.json").write_text(json.dumps(costs, indent=2))
        return
    if args.dice:
        rows = dice(args)
        print_table(rows, ["case", "net", "stage", "dice_whole", "dice_core", "dice_enhancing", "hd95_whole",
                           "seconds"])
        print(f"per-case table: {write_table(rows, out / 'per_case.csv')}")
        return
    image = sub_volume(args)
    print(f"== throughput ({args.threads} thread(s), tile {args.tile}, {image.shape[1:]} volume); "
          "naive = one patch per voxel ==")
    speed = {}
    for name in args.nets:
        speed[name] = throughput(build_net(name, args.data_root), image,
                                 64 if args.smoke_test else NAIVE_SAMPLES.get(name, 512), args.tile)
        row = speed[name]
        print(f"{name:>18}: dense {row['dense_vox_s']:9.0f} vox/s | per-voxel {row['per_voxel_vox_s']:7.0f} vox/s | "
              f"x{row['ratio']:.0f} | max |p_dense - p_voxel| {row['max_prob_diff']:.1e}", flush=True)
    (out / "throughput.json").write_text(json.dumps(speed, indent=2))


if __name__ == "__main__":
    main()
