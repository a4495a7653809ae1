"""Cost of the 2-D segmentation models as configured (conf/model/*.yaml), side by side in one run.

Per model: parameters, multiply-accumulates of one forward pass (torch's FlopCounterMode, MACs =
FLOPs / 2) and CPU forward time for one image at the CamVid CPU budget (240 x 180), one thread.
Then the patch classifier's two evaluations: pixels per second of the naive per-pixel loop against the
dense convolutional pass, and whether both give the same labels.

    .venv/bin/python benchmarks/segmentation_models.py            # ~2 minutes on one core
    .venv/bin/python benchmarks/segmentation_models.py --smoke-test
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from deconvlab.config import compose_config
from deconvlab.models.patchnet import PatchNet

MODELS = {  # label -> config overrides
    "fcn32s": ["model=fcn32s"],
    "fcn16s": ["model=fcn16s"],
    "fcn8s": ["model=fcn8s"],
    "deconvnet (switches)": ["model=deconvnet"],
    "deconvnet (naive unpool)": ["model=deconvnet", "model.unpool=naive"],
    "farabet": ["model=farabet"],
    "farabet + superpixels": ["model=farabet", "model.superpixels=true"],
    "patchnet (dense)": ["model=patchnet"],
}


def build(overrides: list[str]) -> nn.Module:
    cfg = compose_config(["data=camvid", "logger=none", *overrides])
    return instantiate(cfg.model).eval()


def macs(model: nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2


def forward_seconds(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(x)  # warm-up: allocations, SLIC's first call
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_table(size: tuple[int, int], repeats: int) -> None:
    x = torch.rand(1, 3, *size)
    print(f"\nOne {size[1]}x{size[0]} image, batch 1, 1 thread, median of {repeats}")
    print(f"{'model':26s} {'params (M)':>11s} {'GMACs':>8s} {'forward (ms)':>13s}")
    for label, overrides in MODELS.items():
        model = build(overrides)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        # Superpixels add SLIC on the CPU, which FlopCounterMode does not see.
        gmacs = macs(model, x) / 1e9
        ms = forward_seconds(model, x, repeats) * 1e3
        print(f"{label:26s} {params:11.2f} {gmacs:8.2f} {ms:13.1f}")


def one_patch_per_call_rate(model: PatchNet, image: torch.Tensor) -> float:
    """Pixels/s when every pixel's patch is classified by its own forward call (the literal naive way)."""
    padded, p = model._pad(image), model.patch_size
    start = time.perf_counter()
    with torch.no_grad():
        for y in range(image.shape[-2]):
            for x in range(image.shape[-1]):
                model.classify_patches(padded[:, :, y : y + p, x : x + p])
    return image[0, 0].numel() / (time.perf_counter() - start)


def dense_vs_patch(dense_size: tuple[int, int], naive_size: tuple[int, int], repeats: int) -> None:
    torch.manual_seed(0)
    model: PatchNet = build(MODELS["patchnet (dense)"])
    image = torch.rand(1, 3, *naive_size)
    with torch.no_grad():
        same = torch.equal(model(image).argmax(1), model.predict_per_pixel(image).argmax(1))
        start = time.perf_counter()
        model.predict_per_pixel(image)
        row_rate = image[0, 0].numel() / (time.perf_counter() - start)
    single_rate = one_patch_per_call_rate(model, image[..., : naive_size[0] // 3, : naive_size[1] // 3])
    big = torch.rand(1, 3, *dense_size)
    dense_rate = big[0, 0].numel() / forward_seconds(model, big, repeats)
    print(f"\nPatch classifier ({model.patch_size}x{model.patch_size} patches), 1 thread, pixels/s")
    for label, rate in (("naive, one patch per forward call", single_rate),
                        ("naive, one image row per call", row_rate)):
        print(f"{label:36s} {rate:12,.0f}  (dense is {dense_rate / rate:,.0f}x faster)")
    print(f"{f'dense evaluation, {dense_size[1]}x{dense_size[0]}':36s} {dense_rate:12,.0f}")
    print(f"same labels (dense vs per-pixel on a {naive_size[1]}x{naive_size[0]} crop): {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, one repeat (seconds)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.smoke_test:
        model_table((36, 48), repeats=1)
        dense_vs_patch((36, 48), (8, 10), repeats=1)
    else:
        model_table((180, 240), repeats=5)
        dense_vs_patch((180, 240), (45, 60), repeats=5)


if __name__ == "__main__":
    main()
