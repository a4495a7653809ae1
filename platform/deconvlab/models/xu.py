"""Xu et al., "Deep Convolutional Neural Network for Image Deconvolution" (NIPS 2014).

Two sub-networks, each usable alone, and their stack:

* :class:`DeconvCNN` (DCNN): the separable pseudo-inverse kernel as a network: a ``1 x K`` convolution
  with ``r`` output channels, ``r`` separate ``K x 1`` convolutions, and a ``1 x 1`` merge. Initialised
  from the SVD of ``k_dagger`` it computes exactly the rank-r Wiener deconvolution before any training;
  training then adapts it to what the linear model misses (saturation, compression).
* :class:`OutlierRejectionCNN` (ODCNN): a small convolutional network that removes the artefacts a linear
  deconvolution leaves (amplified noise, ringing around clipped highlights, JPEG blocks). Xu uses 512
  kernels of 16x16, a 512-channel 1x1 layer and an 8x8 output; width and sizes are arguments here, with
  a narrow default that trains on a CPU.
* :class:`DeconvOutlierCNN`: DCNN then ODCNN, Xu's full network.

All three follow the restoration contract: ``[B, C, H, W]`` in, the restored image of the same shape out;
channels are restored independently by the same single-channel network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.data.degrade import KernelLike, as_kernel
from deconvlab.models.catalogue import register_model
from deconvlab.models.wiener import pseudo_inverse_kernel, separable_factors

INITS = ("svd", "random")
_TINY_DCNN = {"kernel": [[0.0, 0.125, 0.0], [0.125, 0.5, 0.125], [0.0, 0.125, 0.0]], "support": 7, "rank": 2}


def _check_input(x: torch.Tensor, channels: int | None, min_size: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{name} expects a float tensor [B, C, H, W], got dtype {getattr(x, 'dtype', type(x))}"
        )
    if x.ndim != 4:
        raise ValueError(f"{name} expects [B, C, H, W], got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} was built for {channels} channel(s), got an input with {x.shape[1]}")
    if min(x.shape[-2:]) <= min_size:
        raise ValueError(
            f"{name} needs images larger than {min_size} pixels a side, got {tuple(x.shape[-2:])}"
        )


def _per_channel(x: torch.Tensor, net) -> torch.Tensor:
    """Run a single-channel network on every channel of ``x [B, C, H, W]``."""
    b, c, h, w = x.shape
    return net(x.reshape(b * c, 1, h, w)).reshape(b, c, h, w)


class DeconvCNN(nn.Module):
    """Xu's deconvolution CNN: ``1 x K`` (r channels) -> ``K x 1`` (per channel) -> ``1 x 1`` merge.

    Args:
        kernel: the blur kernel the network deconvolves (needed for ``init="svd"``).
        support: ``K``, the support of the pseudo-inverse kernel (odd; Xu et al. use 121).
        rank: ``r``, the number of separable filter pairs (Xu et al. use 38).
        snr: signal-to-noise power ratio of the Wiener filter the SVD initialisation reproduces.
        init: "svd" (start as the rank-r separable Wiener filter) or "random" (PyTorch's default
            initialisation, to measure what the SVD start buys).
        channels: if given, inputs must have this many channels.
        lr_scale: its learning rate relative to the optimiser's
            (:func:`deconvlab.tasks.base.parameter_groups`): the SVD start's weights are an inverse kernel
            of size ~1e-3, which one Adam step at a rate meant for network weights rewrites.
    """

    def __init__(
        self,
        kernel: KernelLike | None = None,
        support: int = 61,
        rank: int = 16,
        snr: float = 30.0,
        init: str = "svd",
        channels: int | None = None,
        lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.lr_scale = lr_scale
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if support % 2 == 0 or not 1 <= rank <= support:
            raise ValueError(
                f"need an odd support and 1 <= rank <= support, got support={support}, rank={rank}"
            )
        self.support, self.rank, self.channels = support, rank, channels
        self.horizontal = nn.Conv2d(1, rank, (1, support), bias=False)
        self.vertical = nn.Conv2d(rank, rank, (support, 1), groups=rank, bias=False)
        self.merge = nn.Conv2d(rank, 1, 1)
        if init == "svd":
            if kernel is None:
                raise ValueError(
                    "init='svd' needs the blur kernel (got kernel=None); pass it or use init='random'"
                )
            self.init_from_kernel(as_kernel(kernel), snr)

    @torch.no_grad()
    def init_from_kernel(self, kernel: torch.Tensor, snr: float) -> None:
        """Set the weights to the rank-r SVD factors of ``k_dagger`` of ``kernel`` (merge = plain sum)."""
        horizontal, vertical = separable_factors(pseudo_inverse_kernel(kernel, self.support, snr), self.rank)
        self.horizontal.weight.copy_(horizontal[:, None, None, :])
        self.vertical.weight.copy_(vertical[:, None, :, None])
        self.merge.weight.fill_(1.0)
        self.merge.bias.zero_()

    def _single_channel(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.support // 2
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        return self.merge(self.vertical(self.horizontal(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels, self.support // 2, "DeconvCNN")
        return _per_channel(x, self._single_channel)


def _same_padding(size: int, shift_left: bool) -> tuple[int, int]:
    # An even kernel cannot be centred: each one moves the output half a pixel, so alternate the side that
    # gets the extra pixel and Xu's 16x16 then 8x8 layers leave the image where it was.
    return ((size - 1) // 2, size // 2) if shift_left else (size // 2, (size - 1) // 2)


@register_model("xu_odcnn", "restoration", example_shape=(1, 16, 16),
                tiny_kwargs={"width": 4, "kernel_sizes": (4, 1, 2)})
class OutlierRejectionCNN(nn.Module):
    """Xu's outlier-rejection network: conv ``k1`` (width) -> conv ``k2`` (width) -> conv ``k3`` (1).

    Args:
        width: hidden channels (Xu et al.: 512).
        kernel_sizes: the three layers' kernel sizes (Xu et al.: 16, 1, 8).
        residual: predict a correction added to the input, with the last layer initialised to zero so the
            network starts as the identity: stacked after an SVD-initialised DCNN, training starts from
            the Wiener result instead of from noise.
        channels: if given, inputs must have this many channels.
    """

    def __init__(
        self,
        width: int = 32,
        kernel_sizes: Sequence[int] = (16, 1, 8),
        residual: bool = True,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if len(kernel_sizes) != 3 or min(kernel_sizes) < 1:
            raise ValueError(f"kernel_sizes must be three positive sizes, got {list(kernel_sizes)}")
        self.kernel_sizes, self.residual, self.channels = (
            tuple(int(k) for k in kernel_sizes),
            residual,
            channels,
        )
        widths = (1, width, width, 1)
        self.convs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], k) for i, k in enumerate(self.kernel_sizes)
        )
        shift_left, self.paddings = True, []
        for k in self.kernel_sizes:
            self.paddings.append(_same_padding(k, shift_left))
            shift_left ^= k % 2 == 0
        if residual:
            nn.init.zeros_(self.convs[-1].weight)
            nn.init.zeros_(self.convs[-1].bias)

    def _single_channel(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, (conv, (before, after)) in enumerate(zip(self.convs, self.paddings, strict=True)):
            h = conv(F.pad(h, (before, after, before, after), mode="reflect"))
            if i < len(self.convs) - 1:
                h = F.relu(h)
        return x + h if self.residual else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.channels, max(self.kernel_sizes) // 2, "OutlierRejectionCNN")
        return _per_channel(x, self._single_channel)


@register_model("xu_full", "restoration", example_shape=(1, 16, 16),
                tiny_kwargs={**_TINY_DCNN, "width": 4, "kernel_sizes": (4, 1, 2)})
class DeconvOutlierCNN(nn.Module):
    """Xu's full network: :class:`DeconvCNN` followed by :class:`OutlierRejectionCNN`.

    Args:
        kernel, support, rank, snr, init: as for :class:`DeconvCNN`.
        width, kernel_sizes: as for :class:`OutlierRejectionCNN` (residual, so with ``init="svd"`` the
            untrained network equals the rank-r Wiener filter).
        freeze_deconv: keep the deconvolution CNN at its initialisation and train only the outlier
            network (Xu et al. train the two sub-networks separately before fine-tuning them together;
            on a CPU budget, a frozen SVD start avoids large steps wrecking the inverse kernel).
        deconv_lr_scale: the deconvolution CNN's ``lr_scale`` when it is trained jointly.
        outlier: the outlier-rejection network to use instead of Xu's (``width`` and ``kernel_sizes``
            are then unused): a single-channel module mapping ``[N, 1, H, W]`` to the same shape,
            applied to each channel. For a CPU budget, a dilated residual stack
            (:class:`~deconvlab.models.simple.ResidualDeblurCNN`) sees a wider field per multiply-add
            than Xu's 16x16 and 8x8 kernels (docs/benchmarks.md has the comparison).
        channels: if given, inputs must have this many channels.
    """

    def __init__(
        self,
        kernel: KernelLike | None = None,
        support: int = 61,
        rank: int = 16,
        snr: float = 30.0,
        init: str = "svd",
        width: int = 32,
        kernel_sizes: Sequence[int] = (16, 1, 8),
        freeze_deconv: bool = False,
        deconv_lr_scale: float = 1.0,
        outlier: nn.Module | None = None,
        channels: int | None = None,
    ) -> None:
        super().__init__()
        self.deconv = DeconvCNN(kernel, support, rank, snr, init, channels, lr_scale=deconv_lr_scale)
        self.deconv.requires_grad_(not freeze_deconv)
        self.custom_outlier = outlier is not None
        self.outlier = outlier if outlier is not None else OutlierRejectionCNN(
            width, kernel_sizes, residual=True, channels=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        restored = self.deconv(x)
        if self.custom_outlier:
            return _per_channel(restored, self.outlier)
        return self.outlier(restored)


# DeconvCNN has two configurations (conf/model/xu_dcnn*.yaml), so each gets a catalogue entry of its own
# named as its conf file; the start is what makes the variant.
@register_model("xu_dcnn", "restoration", example_shape=(1, 16, 16), tiny_kwargs=_TINY_DCNN)
def xu_dcnn(kernel: KernelLike | None = None, init: str = "svd", **kwargs: Any) -> DeconvCNN:
    """The deconvolution CNN started as the rank-r separable Wiener filter of ``kernel``."""
    return DeconvCNN(kernel, init=init, **kwargs)


@register_model("xu_dcnn_random", "restoration", example_shape=(1, 16, 16), tiny_kwargs=_TINY_DCNN)
def xu_dcnn_random(kernel: KernelLike | None = None, init: str = "random", **kwargs: Any) -> DeconvCNN:
    """The deconvolution CNN from PyTorch's default random initialisation: what the SVD start buys."""
    return DeconvCNN(kernel, init=init, **kwargs)
