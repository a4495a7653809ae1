"""Classical non-blind deconvolution in torch: inverse filter, Wiener, and Xu's separable inverse kernel.

All functions take images ``[..., H, W]`` (any leading batch/channel dimensions) and a blur kernel
``[K, K]``, and return an image of the input's size. Three ideas from Xu et al. (NIPS 2014), section 3:

* the Wiener filter ``G = conj(F(k)) / (|F(k)|^2 + 1/SNR)`` is a convolution, whose spatial kernel
  ``k_dagger`` decays fast, so a finite ``K x K`` support captures it;
* ``k_dagger = sum_j s_j u_j v_j^T`` (its SVD), and a few singular values carry nearly all of it;
* so deconvolution is ``r`` pairs of 1-D convolutions (their eq. 5): O(r K) per pixel instead of O(K^2).

FFT-based filters assume a periodic image; ``boundary="taper"`` pads the image by reflection and tapers
the padding towards its circularly blurred self (MATLAB's ``edgetaper``) so real photographs show no
wrap-around ringing.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.data.degrade import KernelLike, as_kernel, check_image, check_kernel
from deconvlab.models.catalogue import register_model

BOUNDARIES = ("circular", "reflect", "taper")


def psf_to_otf(kernel: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The transfer function ``F(k)`` on an ``H x W`` grid (real FFT, ``[H, W // 2 + 1]``).

    The kernel's centre pixel is moved to the origin so that filtering does not shift the image.
    """
    kh, kw = kernel.shape
    if kh > shape[0] or kw > shape[1]:
        raise ValueError(f"kernel of size {(kh, kw)} is larger than the FFT grid {tuple(shape)}")
    padded = F.pad(kernel, (0, shape[1] - kw, 0, shape[0] - kh))
    padded = torch.roll(padded, shifts=(-(kh // 2), -(kw // 2)), dims=(0, 1))
    return torch.fft.rfft2(padded)


def _circular_blur(image: torch.Tensor, otf: torch.Tensor) -> torch.Tensor:
    return torch.fft.irfft2(torch.fft.rfft2(image) * otf, s=image.shape[-2:])


def _taper_weights(size: int, margin: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 over the image, a raised-cosine ramp from 0 to 1 across each ``margin``-wide padding band."""
    ramp = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(margin, dtype=dtype, device=device) + 0.5) / margin)
    inner = torch.ones(size - 2 * margin, dtype=dtype, device=device)
    return torch.cat([ramp, inner, ramp.flip(0)])


def pad_for_fft(image: torch.Tensor, kernel: torch.Tensor, margin: int, boundary: str) -> torch.Tensor:
    """Extend ``image`` by ``margin`` pixels per side so that a periodic FFT model fits its borders.

    Args:
        image: ``[..., H, W]``.
        kernel: the blur kernel (used by ``boundary="taper"``).
        margin: pixels added on each side (clamped below the image size, as reflection needs).
        boundary: "circular" (no padding), "reflect" (mirror), or "taper" (mirror, then blend the padding
            towards its circularly blurred self so the wrap-around seam is as blurred as the image).
    """
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    if boundary == "circular" or margin <= 0:
        return image
    lead, (h, w) = image.shape[:-2], image.shape[-2:]
    margin = min(margin, h - 1, w - 1)
    padded = F.pad(image.reshape(-1, 1, h, w), (margin,) * 4, mode="reflect").reshape(
        *lead, h + 2 * margin, -1
    )
    if boundary == "reflect":
        return padded
    otf = psf_to_otf(kernel.to(padded), padded.shape[-2:])
    rows = _taper_weights(h + 2 * margin, margin, padded.dtype, padded.device)
    cols = _taper_weights(w + 2 * margin, margin, padded.dtype, padded.device)
    alpha = torch.outer(rows, cols)
    return alpha * padded + (1 - alpha) * _circular_blur(padded, otf)


def _crop(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    top, left = (image.shape[-2] - shape[0]) // 2, (image.shape[-1] - shape[1]) // 2
    return image[..., top : top + shape[0], left : left + shape[1]]


def _default_margin(kernel: torch.Tensor) -> int:
    # The inverse filter's ringing reaches a few blur widths; 3 kernel sizes keeps it off the image.
    return 3 * max(kernel.shape)


def _fft_filter(
    image: torch.Tensor, kernel: torch.Tensor, transfer, boundary: str, margin: int | None
) -> torch.Tensor:
    check_kernel(kernel)
    check_image(image, kernel)
    kernel = kernel.to(image)
    margin = _default_margin(kernel) if margin is None else margin
    padded = pad_for_fft(image, kernel, margin, boundary)
    otf = psf_to_otf(kernel, padded.shape[-2:])
    restored = torch.fft.irfft2(torch.fft.rfft2(padded) * transfer(otf), s=padded.shape[-2:])
    return _crop(restored, image.shape[-2:])


def inverse_filter(
    image: torch.Tensor,
    kernel: torch.Tensor,
    eps: float = 1e-2,
    boundary: str = "taper",
    margin: int | None = None,
) -> torch.Tensor:
    """Naive inverse filter ``F^-1(F(y) / F(k))``, guarded: ``|F(k)|`` is floored at ``eps``.

    Without the guard the zeros of a disk kernel's spectrum divide by ~0; with it, the result still shows
    how badly plain inversion amplifies noise, which is why Wiener regularises.
    """

    def transfer(otf: torch.Tensor) -> torch.Tensor:
        magnitude = otf.abs()
        phase = torch.where(magnitude > 0, otf / magnitude.clamp_min(1e-30), torch.ones_like(otf))
        return 1.0 / (phase * magnitude.clamp_min(eps))

    return _fft_filter(image, kernel, transfer, boundary, margin)


def wiener_transfer(otf: torch.Tensor, nsr: torch.Tensor | float) -> torch.Tensor:
    """``conj(F(k)) / (|F(k)|^2 + NSR)``; ``nsr`` broadcasts against ``otf``'s leading dimensions."""
    return otf.conj() / (otf.abs() ** 2 + nsr)


def estimate_noise_sigma(image: torch.Tensor) -> torch.Tensor:
    """Noise standard deviation per image ``[...]``: median absolute Haar diagonal detail / 0.6745.

    Donoho's robust estimator (as ``skimage.restoration.estimate_sigma``): the finest diagonal wavelet band
    of a natural image is almost all noise.
    """
    h, w = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    x = image[..., :h, :w]
    diagonal = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return diagonal.abs().flatten(-2).median(dim=-1).values / 0.6745


def estimate_nsr(image: torch.Tensor) -> torch.Tensor:
    """Noise-to-signal power ratio per image ``[...]``: noise variance over the signal's variance."""
    noise_var = estimate_noise_sigma(image) ** 2
    signal_var = (image.flatten(-2).var(dim=-1) - noise_var).clamp_min(1e-6)
    return (noise_var / signal_var).clamp_min(1e-6)


def wiener_deconvolve(
    image: torch.Tensor,
    kernel: torch.Tensor,
    snr: float | torch.Tensor | None = None,
    boundary: str = "taper",
    margin: int | None = None,
) -> torch.Tensor:
    """Wiener deconvolution ``F^-1(F(y) conj(F(k)) / (|F(k)|^2 + 1/SNR))``.

    Args:
        image: blurred image ``[..., H, W]``.
        kernel: blur kernel ``[K, K]``.
        snr: signal-to-noise power ratio (a float, or a tensor broadcastable to ``image.shape[:-2]``);
            None estimates it per image with :func:`estimate_nsr`.
        boundary: see :func:`pad_for_fft`; "circular" reproduces the textbook periodic filter.
        margin: padding per side; defaults to three kernel sizes.
    """
    nsr = estimate_nsr(image) if snr is None else 1.0 / torch.as_tensor(snr, dtype=image.dtype)
    nsr = torch.as_tensor(nsr, dtype=image.dtype, device=image.device)
    nsr = nsr.reshape(*nsr.shape, 1, 1)
    return _fft_filter(image, kernel, lambda otf: wiener_transfer(otf, nsr), boundary, margin)


def pseudo_inverse_kernel(
    kernel: torch.Tensor, size: int, snr: float, grid: int | None = None
) -> torch.Tensor:
    """The spatial Wiener kernel ``k_dagger`` cut to ``size x size`` (float64; convolve to deconvolve).

    Args:
        kernel: blur kernel ``[K, K]``.
        size: odd support of the pseudo-inverse (Xu et al. use 121).
        snr: the Wiener filter's signal-to-noise power ratio.
        grid: FFT grid the filter is sampled on; large enough (default ``max(8 size, 1024)``) that the
            kernel's periodic copies do not overlap the crop.

    The cropped kernel is rescaled to the Wiener filter's DC gain ``1 / (1 + 1/SNR)``: the cut-off tails
    do not sum to zero, and a mean-brightness error would dominate the restored image's PSNR.
    """
    check_kernel(kernel)
    if size % 2 == 0 or size < 1:
        raise ValueError(f"pseudo-inverse support must be a positive odd number, got {size}")
    grid = grid or max(8 * size, 1024)
    otf = psf_to_otf(kernel.double(), (grid, grid))
    spatial = torch.fft.irfft2(wiener_transfer(otf, 1.0 / snr), s=(grid, grid))
    spatial = torch.fft.fftshift(spatial)
    centre = grid // 2
    half = size // 2
    cropped = spatial[centre - half : centre + half + 1, centre - half : centre + half + 1]
    return cropped * (snr / (1.0 + snr)) / cropped.sum()


def separable_factors(k_dagger: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``r`` SVD factors of ``k_dagger`` as 1-D correlation filters ``(horizontal, vertical)``.

    Returns two ``[r, K]`` tensors with ``sqrt(s_j)`` folded into each, such that correlating rows with
    ``horizontal[j]``, columns with ``vertical[j]`` and summing over ``j`` convolves with the rank-r
    approximation of ``k_dagger``. The horizontal factors are rescaled so that the approximation keeps
    ``k_dagger``'s DC gain (the sum of its entries): a low-rank cut otherwise shifts mean brightness.
    """
    if not 1 <= rank <= min(k_dagger.shape):
        raise ValueError(f"rank must be in 1..{min(k_dagger.shape)}, got {rank}")
    # torch's conv2d correlates, so factor the flipped kernel: then no flip is needed at run time.
    u, s, vh = torch.linalg.svd(torch.flip(k_dagger, dims=(0, 1)).double())
    root = s[:rank].sqrt()
    horizontal, vertical = vh[:rank] * root[:, None], u[:, :rank].T * root[:, None]
    approx_sum = float((vertical.sum(1) * horizontal.sum(1)).sum())
    if abs(approx_sum) > 1e-3 * abs(float(k_dagger.sum())):
        horizontal = horizontal * (float(k_dagger.sum()) / approx_sum)
    return horizontal, vertical


def choose_rank(k_dagger: torch.Tensor, energy: float = 1e-4) -> int:
    """The smallest rank whose dropped singular values hold less than ``energy`` of the squared total."""
    s2 = torch.linalg.svdvals(k_dagger.double()) ** 2
    dropped = 1.0 - torch.cumsum(s2, 0) / s2.sum()
    return int((dropped < energy).nonzero()[0]) + 1


def _reflect_pad(image: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    if pad_h >= image.shape[-2] or pad_w >= image.shape[-1]:
        raise ValueError(
            f"image {tuple(image.shape[-2:])} is too small for a {2 * pad_h + 1}x{2 * pad_w + 1} filter; "
            "use a larger image or a smaller support"
        )
    return F.pad(image, (pad_w, pad_w, pad_h, pad_h), mode="reflect")


def spatial_filter(image: torch.Tensor, k_dagger: torch.Tensor) -> torch.Tensor:
    """Convolve ``image [..., H, W]`` with the full 2-D ``k_dagger`` (reflect-padded, same size)."""
    lead, (h, w) = image.shape[:-2], image.shape[-2:]
    weight = torch.flip(k_dagger, dims=(0, 1)).to(image)[None, None]
    x = _reflect_pad(image.reshape(-1, 1, h, w), k_dagger.shape[0] // 2, k_dagger.shape[1] // 2)
    return F.conv2d(x, weight).reshape(*lead, h, w)


def separable_filter(image: torch.Tensor, horizontal: torch.Tensor, vertical: torch.Tensor) -> torch.Tensor:
    """Apply ``r`` pairs of 1-D filters (from :func:`separable_factors`) and sum them: Xu's eq. 5.

    Every row is correlated with the ``r`` horizontal filters (``r`` channels), every column of channel
    ``j`` with vertical filter ``j``, and the ``r`` channels are summed. Both passes run as ``conv1d``
    over contiguous lines, which on CPU is about twice as fast as ``1 x K`` / ``K x 1`` ``conv2d``.
    """
    lead, (h, w) = image.shape[:-2], image.shape[-2:]
    rank, support = horizontal.shape
    x = _reflect_pad(image.reshape(-1, 1, h, w), vertical.shape[1] // 2, support // 2)[:, 0]
    n, padded_h = x.shape[0], x.shape[1]
    rows = F.conv1d(x.reshape(n * padded_h, 1, -1), horizontal.to(x)[:, None, :])  # [n Hp, r, W]
    columns = rows.reshape(n, padded_h, rank, w).permute(0, 3, 2, 1).reshape(n * w, rank, padded_h)
    out = F.conv1d(columns, vertical.to(x)[:, None, :], groups=rank).sum(dim=1)  # [n W, H]
    return out.reshape(n, w, h).transpose(1, 2).reshape(*lead, h, w)


@register_model(
    "wiener",
    "restoration",
    example_shape=(1, 32, 32),
    tiny_kwargs={"kernel": [[0.0, 0.125, 0.0], [0.125, 0.5, 0.125], [0.0, 0.125, 0.0]], "learn_snr": True},
)
class Wiener(nn.Module):
    """Wiener deconvolution as a model: a classical baseline the restoration task can evaluate.

    Args:
        kernel: the (known) blur kernel: tensor, nested lists or a kernel file path.
        snr: signal-to-noise power ratio; None estimates it per image and channel.
        boundary: border handling, see :func:`pad_for_fft`.
        margin: padding per side; defaults to three kernel sizes.
        learn_snr: make ``log(1/SNR)`` a trainable parameter (needs ``snr``), so a run can tune the one
            number Wiener has on training data; off, the model has no parameters at all.
        clip: clip the output to [0, 1], the range of the sharp images.
        lr_scale: the learning rate of ``log(1/SNR)`` relative to the optimiser's
            (:func:`deconvlab.tasks.base.parameter_groups`): one log-scale number moves ~50 times too
            slowly at a rate meant for network weights, so a sweep comparing Wiener with networks at one
            ``optim.lr`` would leave its SNR where it started.
    """

    def __init__(
        self,
        kernel: KernelLike,
        snr: float | None = 100.0,
        boundary: str = "taper",
        margin: int | None = None,
        learn_snr: bool = False,
        clip: bool = True,
        lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.lr_scale = lr_scale
        if boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
        if learn_snr and snr is None:
            raise ValueError("learn_snr=True needs an initial snr (got snr=None)")
        if snr is not None and snr <= 0:
            raise ValueError(f"snr must be positive, got {snr}")
        self.register_buffer("kernel", as_kernel(kernel))
        self.boundary, self.margin, self.clip = boundary, margin, clip
        log_nsr = None if snr is None else torch.tensor(-math.log(snr))
        if learn_snr:
            self.log_nsr = nn.Parameter(log_nsr)
        else:
            self.register_buffer("log_nsr", log_nsr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.kernel, name="Wiener input")
        snr = None if self.log_nsr is None else torch.exp(-self.log_nsr)
        out = wiener_deconvolve(x, self.kernel, snr, self.boundary, self.margin)
        return out.clamp(0.0, 1.0) if self.clip else out
