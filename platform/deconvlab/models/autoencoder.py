"""Autoencoders for MNIST: fully connected, and convolutional with an unpooling + deconvolution decoder.

The convolutional one follows mikesj-public/convolutional_autoencoder: valid 3x3 convolutions
(16, 16, pool, 32, pool), dense 128, a linear code of 16, and a decoder that mirrors the encoder with
unpooling and "full" convolutions, i.e. stride-1 ``ConvTranspose2d`` without padding, which grow the map by
``kernel_size - 1`` exactly where the valid convolution shrank it. With the defaults it has the reference's
224,177 parameters (224k). Both models end in a sigmoid so reconstructions lie in [0, 1], and both expose
``encode(x) -> code [B, Z]`` and ``decode(code) -> image``.

Unpooling is a config option (``unpool``), not a copy of the model:

- ``"switches"``: ``MaxUnpool2d`` with the encoder's argmax positions (Zeiler & Fergus, Noh et al.);
  every other position of the 2x2 window is zero. The switches travel from encoder to decoder *beside*
  the code, so a switch autoencoder's reconstruction is not a function of the code alone: it sees about
  one extra bit per pooled value (2 bits of position per 2x2 window). Compare code sizes with that in mind.
- ``"naive"``: each pixel copied into a 2x2 block (nearest-neighbour), the lecture's first proposal and
  the reference's ``Upscale2DLayer``.
- ``"upsample"``: bilinear interpolation by 2, a smooth fixed upsampling without switches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.models.catalogue import register_model

UNPOOL_MODES = ("switches", "naive", "upsample")


def naive_unpool(x: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Copy every pixel of ``x [..., H, W]`` into a ``factor x factor`` block."""
    return x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


class Unpool2d(nn.Module):
    """Inverse of a 2x2, stride-2 max pooling, in one of :data:`UNPOOL_MODES`.

    Args:
        mode: "switches", "naive" or "upsample" (see the module docstring).
    """

    def __init__(self, mode: str = "switches") -> None:
        super().__init__()
        if mode not in UNPOOL_MODES:
            raise ValueError(f"unpool mode must be one of {UNPOOL_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, x: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "switches":
            if indices is None:
                raise ValueError("unpool='switches' needs the encoder's pooling indices; "
                                 "use unpool='naive' or 'upsample' to decode a code on its own")
            return F.max_unpool2d(x, indices, kernel_size=2, stride=2)
        if self.mode == "naive":
            return naive_unpool(x, 2)
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _mlp(sizes: Sequence[int], last_activation: bool) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``, ReLU after each except (optionally) the last."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@register_model("autoencoder_fc", "reconstruction", example_shape=(1, 28, 28),
                tiny_kwargs={"hidden_sizes": [8], "code_size": 2})
class FCAutoencoder(nn.Module):
    """A fully connected autoencoder: flatten, ReLU hidden layers, linear code, mirrored decoder.

    Args:
        in_shape: one image's shape (C, H, W).
        hidden_sizes: widths of the encoder's hidden layers, outermost first; the decoder mirrors them.
            The default (140,) gives 225k parameters, the conv autoencoder's budget (224k).
        code_size: size of the code.
    """

    def __init__(self, in_shape: Sequence[int] = (1, 28, 28), hidden_sizes: Sequence[int] = (140,),
                 code_size: int = 16) -> None:
        super().__init__()
        self.in_shape, self.code_size = tuple(in_shape), code_size
        sizes = [math.prod(self.in_shape), *hidden_sizes, code_size]
        self.encoder = _mlp(sizes, last_activation=False)
        self.decoder = _mlp(sizes[::-1], last_activation=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(code)).view(-1, *self.in_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _valid_conv_sizes(side: int, blocks: Sequence[Sequence[int]], kernel_size: int) -> list[int]:
    """Spatial side entering each pooling; raises if a pooling would see an odd (or empty) map."""
    sides = []
    for i, block in enumerate(blocks):
        side -= len(block) * (kernel_size - 1)
        if side <= 0 or side % 2:
            raise ValueError(
                f"conv block {i} outputs a {side}-pixel side before 2x2 pooling; each pooling needs an even, "
                f"positive side so that unpooling restores it exactly: change conv_channels or kernel_size"
            )
        sides.append(side)
        side //= 2
    return sides


@register_model("autoencoder_conv", "reconstruction", example_shape=(1, 28, 28),
                tiny_kwargs={"conv_channels": [[2, 2], [4]], "dense_size": 8, "code_size": 2})
class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder whose decoder is unpooling + transposed convolution.

    Encoder: for each block of ``conv_channels``, valid ``kernel_size`` convolutions with ReLU, then 2x2
    max pooling; flatten; dense ``dense_size`` (ReLU); linear code. Decoder: the exact mirror, where
    each pooling becomes an :class:`Unpool2d` and each convolution a stride-1 ``ConvTranspose2d`` back
    to the convolution's input channels; a sigmoid on the last one.

    Args:
        in_shape: one image's shape (C, H, W), square.
        conv_channels: output channels of the convolutions, grouped into blocks that end in a pooling.
        kernel_size: side of every convolution kernel.
        dense_size: width of the dense layer on each side of the code (0 = none).
        code_size: size of the code.
        unpool: "switches", "naive" or "upsample".
    """

    def __init__(self, in_shape: Sequence[int] = (1, 28, 28),
                 conv_channels: Sequence[Sequence[int]] = ((16, 16), (32,)), kernel_size: int = 3,
                 dense_size: int = 128, code_size: int = 16, unpool: str = "naive") -> None:
        super().__init__()
        channels, height, width = in_shape
        if height != width:
            raise ValueError(f"ConvAutoencoder expects square images, got in_shape={tuple(in_shape)}")
        blocks = [list(b) for b in conv_channels]
        _valid_conv_sizes(height, blocks, kernel_size)
        self.code_size = code_size
        self.encoder_blocks, self.decoder_blocks = nn.ModuleList(), nn.ModuleList()
        cin = channels
        for block in blocks:
            down, up = [], []
            for cout in block:
                down += [nn.Conv2d(cin, cout, kernel_size), nn.ReLU(inplace=True)]
                # Mirror: back to cin; the final image layer gets the sigmoid in decode(), not a ReLU.
                up = [nn.ConvTranspose2d(cout, cin, kernel_size), nn.ReLU(inplace=True), *up]
                cin = cout
            self.encoder_blocks.append(nn.Sequential(*down))
            self.decoder_blocks.insert(0, nn.Sequential(*up))
        self.decoder_blocks[-1] = self.decoder_blocks[-1][:-1]
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = Unpool2d(unpool)
        side = height
        for block in blocks:
            side = (side - len(block) * (kernel_size - 1)) // 2
        self.bottom_shape = (cin, side, side)
        dense = [math.prod(self.bottom_shape), *([dense_size] if dense_size else []), code_size]
        self.to_code = _mlp(dense, last_activation=False)
        self.from_code = _mlp(dense[::-1], last_activation=True)

    def encode_with_switches(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The code and the pooling indices (outermost first) that ``unpool='switches'`` needs."""
        switches = []
        for block in self.encoder_blocks:
            x, indices = self.pool(block(x))
            switches.append(indices)
        return self.to_code(x.flatten(1)), switches

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_with_switches(x)[0]

    def decode(self, code: torch.Tensor, switches: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Image from ``code``; ``switches`` (see :meth:`encode_with_switches`) only for unpool='switches'."""
        x = self.from_code(code).view(-1, *self.bottom_shape)
        for depth, block in enumerate(self.decoder_blocks):
            indices = None if switches is None else switches[len(switches) - 1 - depth]
            x = block(self.unpool(x, indices))
        return torch.sigmoid(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code, switches = self.encode_with_switches(x)
        return self.decode(code, switches)
