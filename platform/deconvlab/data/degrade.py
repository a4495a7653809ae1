"""The blur model y = x * k + n and the ways real photographs break it (saturation, JPEG).

Images are float tensors in [0, 1] shaped ``[..., H, W]`` (usually ``[C, H, W]``); kernels are 2-D
float tensors of odd size that sum to 1. Every random choice takes an explicit ``torch.Generator`` so a
degradation is reproducible by seed. From Hydra a degradation reads, for example::

    _target_: deconvlab.data.degrade.Degradation
    kernel: {_target_: deconvlab.data.degrade.disk_kernel, radius: 7}
    noise_sigma: 0.01
    saturation_gain: 2.0
    jpeg_quality: 90
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KernelLike = torch.Tensor | np.ndarray | str | os.PathLike | list


def _odd_size(size: int | None, radius: float) -> int:
    size = size or 2 * math.ceil(radius) + 1
    if size % 2 == 0:
        raise ValueError(f"kernel size must be odd, got {size}")
    return size


def _normalised(kernel: torch.Tensor) -> torch.Tensor:
    return kernel / kernel.sum()


def disk_kernel(radius: float, size: int | None = None) -> torch.Tensor:
    """Out-of-focus blur: a uniform disk of ``radius`` pixels, anti-aliased by 8x supersampling."""
    if radius <= 0:
        raise ValueError(f"disk radius must be positive, got {radius}")
    size = _odd_size(size, radius)
    supersample = 8
    steps = (torch.arange(size * supersample, dtype=torch.float64) + 0.5) / supersample - size / 2
    yy, xx = torch.meshgrid(steps, steps, indexing="ij")
    inside = ((yy**2 + xx**2) <= radius**2).double()
    cover = inside.reshape(size, supersample, size, supersample).mean(dim=(1, 3))
    return _normalised(cover).float()


def gaussian_kernel(sigma: float, size: int | None = None) -> torch.Tensor:
    """Isotropic Gaussian blur with standard deviation ``sigma``; support of 3 sigma by default."""
    if sigma <= 0:
        raise ValueError(f"gaussian sigma must be positive, got {sigma}")
    size = _odd_size(size, 3 * sigma)
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    return _normalised(torch.outer(g, g)).float()


def motion_kernel(length: float, angle: float = 0.0, size: int | None = None) -> torch.Tensor:
    """Linear camera motion: a segment of ``length`` pixels at ``angle`` degrees (counter-clockwise).

    The segment is centred on the kernel's centre pixel and rasterised by splatting densely spaced
    points bilinearly, so fractional lengths and any angle give a smooth, energy-preserving kernel.
    """
    if length < 1:
        raise ValueError(f"motion length must be at least 1 pixel, got {length}")
    size = _odd_size(size, (length + 1) / 2)  # half the segment plus a pixel for the bilinear splat
    theta = math.radians(angle)
    t = torch.linspace(-(length - 1) / 2, (length - 1) / 2, max(2, int(8 * length)), dtype=torch.float64)
    # Rows grow downwards, so a counter-clockwise angle moves up (negative row) as x grows.
    cols, rows = size // 2 + t * math.cos(theta), size // 2 - t * math.sin(theta)
    kernel = torch.zeros(size, size, dtype=torch.float64)
    r0, c0 = rows.floor().long(), cols.floor().long()
    fr, fc = rows - r0, cols - c0
    for dr, dc, w in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        r, c = r0 + dr, c0 + dc
        keep = (r >= 0) & (r < size) & (c >= 0) & (c < size)
        kernel.index_put_((r[keep], c[keep]), w[keep], accumulate=True)
    return _normalised(kernel).float()


def load_kernel(path: str | os.PathLike) -> torch.Tensor:
    """Read a measured or published blur kernel: ``.npy``, text (``.txt``/``.csv``) or an image file.

    The kernel is padded to odd size if needed (a zero row/column at the end) and normalised to sum 1.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"kernel file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path)
    elif suffix in (".txt", ".csv"):
        array = np.loadtxt(path, delimiter="," if suffix == ".csv" else None, ndmin=2)
    else:
        from skimage import io

        array = io.imread(path, as_gray=True)
    kernel = check_kernel(torch.as_tensor(np.asarray(array, dtype=np.float64)), name=str(path))
    pad_h, pad_w = 1 - kernel.shape[0] % 2, 1 - kernel.shape[1] % 2
    kernel = F.pad(kernel, (0, pad_w, 0, pad_h))
    return _normalised(kernel).float()


KERNEL_KINDS = ("disk", "gaussian", "motion", "file")


def make_kernel(
    kind: str,
    radius: float | None = None,
    sigma: float | None = None,
    length: float | None = None,
    angle: float = 0.0,
    path: str | None = None,
    size: int | None = None,
) -> torch.Tensor:
    """One entry point for every kernel kind, so a config or a sweep can switch kinds by override.

    Parameters that belong to other kinds are ignored: Hydra merges an override into the existing
    kernel node, so ``kernel.kind=motion kernel.length=15`` leaves the disk's ``radius`` behind.

    Args:
        kind: "disk" (needs ``radius``), "gaussian" (``sigma``), "motion" (``length``, ``angle`` in
            degrees) or "file" (``path``, see :func:`load_kernel`).
        size: odd kernel side; the default fits the kernel's support.
    """
    needs = {
        "disk": ("radius", radius),
        "gaussian": ("sigma", sigma),
        "motion": ("length", length),
        "file": ("path", path),
    }
    if kind not in needs:
        raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {kind!r}")
    name, value = needs[kind]
    if value is None:
        raise ValueError(f"a {kind!r} kernel needs {name!r} (got {name}=None)")
    if kind == "disk":
        return disk_kernel(radius, size)
    if kind == "gaussian":
        return gaussian_kernel(sigma, size)
    if kind == "motion":
        return motion_kernel(length, angle, size)
    return load_kernel(path)


def check_kernel(kernel: torch.Tensor, name: str = "kernel") -> torch.Tensor:
    """Validate a blur kernel: 2-D, finite, non-negative sum far from 0; returns it unchanged.

    Raises:
        ValueError: naming the offending shape or value and ``name`` (e.g. the file it came from).
    """
    if kernel.ndim != 2:
        raise ValueError(f"{name} must be 2-D [K, K], got shape {tuple(kernel.shape)}")
    if not torch.isfinite(kernel).all():
        raise ValueError(f"{name} contains NaN or inf values")
    total = float(kernel.sum())
    if abs(total) < 1e-8:
        raise ValueError(f"{name} sums to {total:g}; a blur kernel must sum to a non-zero value (usually 1)")
    return kernel


def as_kernel(kernel: KernelLike) -> torch.Tensor:
    """A float32 kernel tensor from a tensor, an array, nested lists (e.g. a Hydra list) or a file path."""
    if isinstance(kernel, (str, os.PathLike)):
        return load_kernel(kernel)
    if not isinstance(kernel, (torch.Tensor, np.ndarray)):
        kernel = np.asarray([list(row) for row in kernel], dtype=np.float64)
    return check_kernel(torch.as_tensor(kernel, dtype=torch.float32))


def check_image(image: torch.Tensor, kernel: torch.Tensor | None = None, name: str = "image") -> None:
    """Validate a float image ``[..., H, W]`` (optionally against a kernel it will be convolved with).

    Raises:
        TypeError: the image is not a floating-point tensor (e.g. uint8 straight from a file).
        ValueError: the image has fewer than 2 dimensions, is channels-last, or is smaller than the kernel.
    """
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        dtype = getattr(image, "dtype", type(image).__name__)
        raise TypeError(
            f"{name} must be a float tensor in [0, 1], got dtype {dtype}; use image.float() / 255"
        )
    if image.ndim < 2:
        raise ValueError(f"{name} must be [..., H, W], got shape {tuple(image.shape)}")
    if image.ndim == 3 and image.shape[0] not in (1, 3) and image.shape[-1] in (1, 3):
        raise ValueError(
            f"{name} has shape {tuple(image.shape)}, which looks channels-last [H, W, C]; "
            "pass [C, H, W] (image.permute(2, 0, 1))"
        )
    if kernel is not None and (kernel.shape[0] > image.shape[-2] or kernel.shape[1] > image.shape[-1]):
        raise ValueError(
            f"kernel of size {tuple(kernel.shape)} is larger than the {name} {tuple(image.shape[-2:])}; "
            "use a larger image or a smaller kernel"
        )


def blur(image: torch.Tensor, kernel: torch.Tensor, padding_mode: str = "reflect") -> torch.Tensor:
    """Convolve ``image [..., H, W]`` with ``kernel [K, K]`` (a true convolution, kernel flipped).

    The output has the input's size; borders are padded with ``padding_mode`` ("reflect",
    "replicate" or "circular") so that no wrap-around appears unless asked for.
    """
    check_kernel(kernel)
    check_image(image, kernel)
    lead = image.shape[:-2]
    x = image.reshape(-1, 1, *image.shape[-2:])
    k = torch.flip(kernel.to(x), dims=(0, 1))[None, None]
    pad_h, pad_w = kernel.shape[0] // 2, kernel.shape[1] // 2
    x = F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=padding_mode)
    return F.conv2d(x, k).reshape(*lead, *image.shape[-2:])


def add_gaussian_noise(
    image: torch.Tensor, sigma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add white Gaussian noise of standard deviation ``sigma`` (image units, [0, 1] range)."""
    if sigma == 0:
        return image
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    return image + sigma * noise


def boost_highlights(image: torch.Tensor, gain: float, threshold: float = 0.8) -> torch.Tensor:
    """Stretch intensities above ``threshold`` by ``gain``: the scene radiance a sensor will clip.

    Applied to the sharp image before blurring, then clipped after it, this reproduces the blurred
    light streaks of saturated highlights that break the linear model (Xu et al.'s outliers).
    """
    if gain < 1:
        raise ValueError(f"saturation gain must be >= 1 (1 = off), got {gain}")
    return image + (gain - 1.0) * (image - threshold).clamp_min(0.0)


def jpeg_compress(image: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip ``image [..., H, W]`` in [0, 1] through 8-bit JPEG at ``quality`` (1..100).

    Three-channel images are compressed as colour, anything else channel by channel as grey.
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    import albumentations as A

    compress = A.ImageCompression(compression_type="jpeg", quality_range=(int(quality),) * 2, p=1.0)
    array = (image.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    if image.ndim == 3 and image.shape[0] == 3:
        out = compress(image=np.ascontiguousarray(array.transpose(1, 2, 0)))["image"].transpose(2, 0, 1)
    else:
        flat = array.reshape(-1, *array.shape[-2:])
        out = np.stack([compress(image=np.ascontiguousarray(c))["image"] for c in flat]).reshape(array.shape)
    return torch.from_numpy(np.ascontiguousarray(out)).to(image.dtype).div(255).to(image.device)


class Degradation:
    """y = jpeg(clip(boost(x) * k + n)): blur, noise, optional saturation and JPEG compression.

    Args:
        kernel: the blur kernel ``[K, K]``: a tensor (build it with :func:`disk_kernel`,
            :func:`gaussian_kernel`, :func:`motion_kernel`, or from Hydra with a ``_target_``), nested
            lists, or the path of a kernel file (see :func:`load_kernel`).
        noise_sigma: standard deviation of the additive Gaussian noise, in [0, 1] image units.
        clip: clip the result to [0, 1] as an 8-bit sensor would (forced on with saturation or JPEG).
        saturation_gain: highlights above ``saturation_threshold`` are stretched by this factor before
            blurring and clipped after it; 1 turns saturation off.
        saturation_threshold: the intensity above which highlights are boosted.
        jpeg_quality: JPEG quality (1..100) of the final image; None for no compression.
    """

    def __init__(
        self,
        kernel: KernelLike,
        noise_sigma: float = 0.0,
        clip: bool = True,
        saturation_gain: float = 1.0,
        saturation_threshold: float = 0.8,
        jpeg_quality: int | None = None,
    ) -> None:
        self.kernel = as_kernel(kernel)
        if noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {noise_sigma}")
        if saturation_gain < 1:
            raise ValueError(f"saturation_gain must be >= 1 (1 = off), got {saturation_gain}")
        if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100 or None, got {jpeg_quality}")
        self.noise_sigma = float(noise_sigma)
        self.saturation_gain = float(saturation_gain)
        self.saturation_threshold = float(saturation_threshold)
        self.jpeg_quality = None if jpeg_quality is None else int(jpeg_quality)
        self.clip = clip or self.saturation_gain > 1 or self.jpeg_quality is not None

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_image(image, self.kernel)
        x = boost_highlights(image, self.saturation_gain, self.saturation_threshold)
        y = add_gaussian_noise(blur(x, self.kernel), self.noise_sigma, generator)
        if self.clip:
            y = y.clamp(0.0, 1.0)
        return y if self.jpeg_quality is None else jpeg_compress(y, self.jpeg_quality)

    def __repr__(self) -> str:
        return (
            f"Degradation(kernel={tuple(self.kernel.shape)}, noise_sigma={self.noise_sigma}, "
            f"clip={self.clip}, saturation_gain={self.saturation_gain}, "
            f"saturation_threshold={self.saturation_threshold}, jpeg_quality={self.jpeg_quality})"
        )
