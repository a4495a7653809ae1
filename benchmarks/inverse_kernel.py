"""Classical deconvolution side by side on real images, and separable vs full pseudo-inverse speed.

Part 1 (quality): each evaluation image is degraded once per setting (disk blur r=7 + 1% noise; the
same with saturation and JPEG q=90), then restored by the naive inverse filter, Wiener (SNR tuned on
training images, and SNR estimated per image), the full 2-D pseudo-inverse kernel k_dagger and its rank-r
separable approximations; optionally a trained Xu network from a Lightning checkpoint. Mean PSNR/SSIM.

Part 2 (speed): for K in {31, 61, 121} on a 512x512 image, the time of the full 2-D convolution with
k_dagger, of the rank-r separable 1-D convolutions (r picked by singular-value energy, and r=3), and of
FFT Wiener, measured in interleaved rounds in one run (median, one thread), with each one's PSNR, its gap to exact
(FFT) Wiener, its multiply-adds per pixel against the full kernel's, and the rate it reached (GMAC/s): the
time ratio differs from the MAC ratio by how well each convolution uses the CPU.

    python benchmarks/inverse_kernel.py                       # BSD68 val split + Set5 when present
    python benchmarks/inverse_kernel.py --smoke-test          # seconds, skimage images
    python benchmarks/inverse_kernel.py --xu-checkpoint outputs/.../best.ckpt \
        --xu-experiment xu_full_disk7_sat_jpeg90_bsd68
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from deconvlab.data.degrade import Degradation, disk_kernel
from deconvlab.data.images import SKIMAGE_SPLITS, list_image_files, load_image_files, load_skimage_images
from deconvlab.models.wiener import (
    choose_rank,
    inverse_filter,
    pseudo_inverse_kernel,
    separable_factors,
    separable_filter,
    spatial_filter,
    wiener_deconvolve,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SNR_GRID = (10.0, 20.0, 30.0, 50.0, 100.0, 200.0, 500.0)
SETTINGS = {
    "disk7+noise": dict(noise_sigma=0.01),
    "disk7+noise+sat+jpeg90": dict(
        noise_sigma=0.01, saturation_gain=2.0, saturation_threshold=0.8, jpeg_quality=90
    ),
}


def psnr(restored: torch.Tensor, target: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((restored.clamp(0, 1) - target) ** 2).mean()))


def ssim(restored: torch.Tensor, target: torch.Tensor) -> float:
    batch = restored.clamp(0, 1).reshape(1, 1, *restored.shape[-2:]).double()
    return float(
        structural_similarity_index_measure(batch, target.reshape(batch.shape).double(), data_range=1.0)
    )


def image_sets(smoke: bool) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """name -> (training images for tuning, evaluation images), grayscale [H, W] in [0, 1]."""

    def tensors(arrays) -> list[torch.Tensor]:
        return [torch.from_numpy(a) for a in arrays]

    train_skimage = tensors(load_skimage_images(SKIMAGE_SPLITS["train"][:4]))
    if smoke:
        return {
            "skimage-val": (
                train_skimage[:1],
                [t[192:320, 192:320] for t in tensors(load_skimage_images(["camera"]))],
            )
        }
    sets = {}
    bsd68 = SHARED_DATA / "deblur" / "BSD68"
    if bsd68.is_dir():
        train = tensors(load_image_files(list_image_files(bsd68, "train")[:8]))
        sets["BSD68-val"] = (train, tensors(load_image_files(list_image_files(bsd68, "val"))))
        set5 = SHARED_DATA / "deblur" / "Set5"
        if set5.is_dir():
            sets["Set5"] = (train, tensors(load_image_files(list_image_files(set5, "test"))))
    if not sets:
        sets["skimage-val"] = (train_skimage, tensors(load_skimage_images(SKIMAGE_SPLITS["val"])))
    return sets


def tune_snr(images: list[torch.Tensor], kernel: torch.Tensor, degradation: Degradation) -> float:
    """The Wiener SNR of the grid with the best mean PSNR on the (training) images."""
    pairs = [(degradation(x[None], torch.Generator().manual_seed(i))[0], x) for i, x in enumerate(images)]
    scores = {
        snr: statistics.mean(psnr(wiener_deconvolve(y, kernel, snr), x) for y, x in pairs) for snr in SNR_GRID
    }
    return max(scores, key=scores.get)


def load_xu(checkpoint: str, experiment: str) -> torch.nn.Module:
    """A trained restoration model: the experiment's model config with the checkpoint's weights."""
    from hydra.utils import instantiate

    from deconvlab.config import compose_config

    model = instantiate(compose_config([f"experiment={experiment}"]).model)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = {
        k.removeprefix("model."): v
        for k, v in state.get("state_dict", state).items()
        if k.startswith("model.")
    }
    model.load_state_dict(state)
    return model.eval()


def methods(
    kernel: torch.Tensor, snr: float, support: int, xu: torch.nn.Module | None
) -> dict[str, Callable]:
    k_dagger = pseudo_inverse_kernel(kernel, support, snr).float()
    picked = choose_rank(k_dagger)
    table: dict[str, Callable] = {
        "blurred input": lambda y: y,
        "naive inverse (guarded)": lambda y: inverse_filter(y, kernel),
        f"Wiener FFT, SNR={snr:g} (tuned)": lambda y: wiener_deconvolve(y, kernel, snr),
        "Wiener FFT, SNR estimated": lambda y: wiener_deconvolve(y, kernel, None),
        f"k_dagger full 2-D, K={support}": lambda y: spatial_filter(y, k_dagger),
    }
    for rank in sorted({1, 2, 4, 8, picked}):
        factors = separable_factors(k_dagger, rank)
        label = f"k_dagger rank {rank}" + (" (picked)" if rank == picked else "")
        table[label] = lambda y, f=factors: separable_filter(y, *f)
    if xu is not None:
        table["Xu network (trained)"] = lambda y: xu(y[None, None])[0, 0]
    return table


def quality(smoke: bool, support: int, xu: torch.nn.Module | None) -> None:
    kernel = disk_kernel(7)
    for set_name, (train, evaluation) in image_sets(smoke).items():
        for setting, kwargs in SETTINGS.items():
            degradation = Degradation(kernel, **kwargs)
            snr = tune_snr(train, kernel, degradation)
            pairs = [
                (degradation(x[None], torch.Generator().manual_seed(1000 + i))[0], x)
                for i, x in enumerate(evaluation)
            ]
            print(f"\n### {set_name} ({len(pairs)} images), {setting}\n")
            print("| method | PSNR dB | SSIM |\n|---|---|---|")
            with torch.no_grad():
                for label, restore in methods(kernel, snr, support, xu).items():
                    outputs = [(restore(y), x) for y, x in pairs]
                    mean_psnr = statistics.mean(psnr(o, x) for o, x in outputs)
                    mean_ssim = statistics.mean(ssim(o, x) for o, x in outputs)
                    print(f"| {label} | {mean_psnr:.2f} | {mean_ssim:.3f} |")


def interleaved_medians(runs: dict[str, Callable[[], torch.Tensor]], rounds: int
                        ) -> dict[str, tuple[float, torch.Tensor]]:
    """Median seconds and last output of each run, timed in ``rounds`` interleaved rounds.

    Each round runs every method once, in an order rotated by one per round, so a burst of load on this
    shared machine slows all methods alike instead of whichever happened to be running.
    """
    outputs = {label: fn() for label, fn in runs.items()}  # warm-up: allocations, first-call dispatch
    times: dict[str, list[float]] = {label: [] for label in runs}
    labels = list(runs)
    for round_index in range(rounds):
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            outputs[label] = runs[label]()
            times[label].append(time.perf_counter() - start)
    return {label: (statistics.median(times[label]), outputs[label]) for label in labels}


def macs_per_pixel(label: str, support: int, rank: int | None) -> float | None:
    """Multiply-adds per output pixel of a spatial method (None for FFT Wiener)."""
    if label.startswith("full"):
        return float(support * support)
    if rank is not None:
        return 2.0 * rank * support + rank  # r horizontal + r vertical K-tap passes, then the r-way sum
    return None


def speed(smoke: bool, snr: float = 30.0) -> None:
    from skimage import data

    size, supports, rounds = (128, (15, 31), 1) if smoke else (512, (31, 61, 121), 7)
    top = (512 - size) // 2  # the centre: the camera's top-left corner is flat sky
    sharp = torch.from_numpy(data.camera()[top : top + size, top : top + size] / 255.0).float()
    kernel = disk_kernel(7)
    blurred = Degradation(kernel, 0.01)(sharp[None], torch.Generator().manual_seed(0))[0]
    exact = psnr(wiener_deconvolve(blurred, kernel, snr), sharp)
    print(f"\n### Speed on a {size}x{size} image (disk r=7, 1% noise, SNR={snr:g}, 1 thread, "
          f"median of {rounds} interleaved rounds)\n")
    print(f"exact FFT Wiener PSNR: {exact:.2f} dB\n")
    print("| K | method | time ms | PSNR dB | gap to FFT Wiener dB | speed-up vs full 2-D | MAC ratio | GMAC/s |")
    print("|---|---|---|---|---|---|---|---|")
    for support in supports:
        k_dagger = pseudo_inverse_kernel(kernel, support, snr).float()
        picked = choose_rank(k_dagger)
        runs = {"full 2-D conv": lambda kd=k_dagger: spatial_filter(blurred, kd)}
        ranks: dict[str, int | None] = {"full 2-D conv": None}
        for rank in sorted({3, picked}):
            factors = separable_factors(k_dagger, rank)
            label = f"separable r={rank}" + (" (picked)" if rank == picked else "")
            runs[label], ranks[label] = (lambda f=factors: separable_filter(blurred, *f)), rank
        runs["FFT Wiener"], ranks["FFT Wiener"] = (lambda: wiener_deconvolve(blurred, kernel, snr)), None
        results = interleaved_medians(runs, rounds)
        full_time, full_macs = results["full 2-D conv"][0], float(support * support)
        for label, (seconds, out) in results.items():
            value = psnr(out, sharp)
            macs = macs_per_pixel(label, support, ranks[label])
            ratio = f"{full_macs / macs:.1f}x" if macs else "-"
            rate = f"{macs * size * size / seconds / 1e9:.2f}" if macs else "-"
            print(f"| {support} | {label} | {seconds * 1e3:.1f} | {value:.2f} | {value - exact:+.2f} | "
                  f"{full_time / seconds:.1f}x | {ratio} | {rate} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke-test", action="store_true", help="one small image, seconds")
    parser.add_argument("--support", type=int, default=121, help="support K of k_dagger in part 1")
    parser.add_argument("--xu-checkpoint", help="a Lightning checkpoint of a trained Xu model (part 1)")
    parser.add_argument(
        "--xu-experiment",
        default="xu_full_disk7_sat_jpeg90_bsd68",
        help="the experiment whose model config matches the checkpoint",
    )
    parser.add_argument("--skip-speed", action="store_true", help="part 1 only")
    parser.add_argument("--skip-quality", action="store_true", help="part 2 only")
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    torch.set_num_threads(1)
    xu = load_xu(args.xu_checkpoint, args.xu_experiment) if args.xu_checkpoint else None
    if not args.skip_quality:
        quality(args.smoke_test, 31 if args.smoke_test else args.support, xu)
    if not args.skip_speed:
        speed(args.smoke_test)


if __name__ == "__main__":
    main()
