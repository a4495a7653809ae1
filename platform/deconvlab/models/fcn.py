"""Fully convolutional networks, FCN-32s / FCN-16s / FCN-8s (Long, Shelhamer & Darrell, CVPR 2015).

VGG-16 with its classifier turned into convolutions (fc6 as a 7x7 conv, fc7 as a 1x1 conv), a 1x1 score
layer, and learned upsampling by transposed convolutions initialised to bilinear interpolation. FCN-16s
and FCN-8s add 1x1 score layers on pool4 and pool3, zero-initialised so that training starts from the
coarser net's prediction, and fuse them by summation after a 2x upsampling.

Alignment. The Caffe original pads the input by 100 pixels (so that fc6 can be a *valid* 7x7 conv that
reuses ImageNet weights) and then crops every fused map at hand-derived offsets (5, 9, 31). Nothing here
is pretrained, so fc6 uses same padding instead, and with same-padded convs and ``ceil_mode`` pooling
pixel j of every stride-s map is centred on input pixel s*j + (s-1)/2. :class:`BilinearUpsample` maps
that grid exactly onto the stride-s/f grid, so each fusion and the final output crop at offset 0 and
only trim the extra row/column that ``ceil_mode`` adds for sizes that are not multiples of the stride.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.models.catalogue import register_model
from deconvlab.models.vgg import VGG16, he_init, scaled

FCN_STRIDES = (32, 16, 8)


def bilinear_kernel(factor: int) -> torch.Tensor:
    """The 2f x 2f kernel of bilinear upsampling by ``factor`` f (a transposed conv of stride f)."""
    size = 2 * factor
    centre = factor - 0.5  # the kernel is even-sized: its centre falls between two taps
    taps = 1 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor
    return torch.outer(taps, taps)


class BilinearUpsample(nn.Module):
    """Upsampling by an even integer ``factor`` with a transposed conv initialised to bilinear.

    With the bilinear initialisation the output equals
    ``F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)`` exactly, borders
    included: the input is replicate-padded by one pixel before the transposed conv (what ``interpolate``
    does by clamping) and the extra ``factor`` pixels are cropped on each side afterwards.

    Args:
        channels: input and output channels (the kernel is channel-diagonal at initialisation).
        factor: the upsampling factor, even (2, 8, 16, 32 in the FCNs).
        learnable: learn the full channels x channels kernel (FCN's in-network upsampling); otherwise
            a fixed, per-channel bilinear filter (FCN's final upsampling, kept at bilinear in the paper).
    """

    def __init__(self, channels: int, factor: int, learnable: bool = True) -> None:
        super().__init__()
        if factor < 2 or factor % 2:
            raise ValueError(f"BilinearUpsample needs an even factor >= 2, got {factor}")
        self.channels, self.factor, self.learnable = channels, factor, learnable
        kernel = bilinear_kernel(factor)
        if learnable:
            weight = torch.zeros(channels, channels, 2 * factor, 2 * factor)
            weight[range(channels), range(channels)] = kernel
            self.weight = nn.Parameter(weight)
        else:
            self.register_buffer("weight", kernel.expand(channels, 1, -1, -1).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factor
        x = F.pad(x, (1, 1, 1, 1), mode="replicate")
        groups = 1 if self.learnable else self.channels
        y = F.conv_transpose2d(x, self.weight, stride=f, padding=f // 2, groups=groups)
        return y[..., f:-f, f:-f]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.factor}, learnable={self.learnable}"


def _crop_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Keep the top-left ``reference``-sized window: the grids share their origin (see module doc)."""
    return x[..., : reference.shape[-2], : reference.shape[-1]]


def _fc_layers(in_channels: int, channels: int, kernel_size: int, batch_norm: bool,
               dropout: float) -> nn.Sequential:
    """VGG's fc6/fc7 as convolutions: k x k then 1 x 1, each with ReLU and dropout."""
    layers: list[nn.Module] = []
    for k, c_in in ((kernel_size, in_channels), (1, channels)):
        layers.append(nn.Conv2d(c_in, channels, k, padding=k // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(channels))
        layers += [nn.ReLU(inplace=True), nn.Dropout2d(dropout)]
    return nn.Sequential(*layers)


def _zero_conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class FCN(nn.Module):
    """FCN-32s, FCN-16s or FCN-8s on a VGG-16 backbone; logits have the input's size, any size.

    Args:
        num_classes: number of output classes.
        stride: 32, 16 or 8: the finest stride whose pool features are fused (FCN-32s/16s/8s).
        in_channels: image channels.
        width: channel multiplier for the backbone and the fc layers.
        batch_norm: BatchNorm after every conv (not in the paper, which fine-tunes ImageNet weights).
        fc_channels: channels of fc6/fc7 before the width multiplier (4096 in VGG-16).
        fc_kernel: fc6's kernel size (7 in VGG-16, where it replaces the 7x7x512 -> 4096 layer).
        dropout: dropout after fc6 and fc7.
    """

    def __init__(self, num_classes: int, stride: int = 8, in_channels: int = 3, width: float = 1.0,
                 batch_norm: bool = False, fc_channels: int = 4096, fc_kernel: int = 7,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if stride not in FCN_STRIDES:
            raise ValueError(f"FCN stride must be one of {FCN_STRIDES} (FCN-32s/16s/8s), got {stride}")
        self.stride = stride
        self.backbone = VGG16(in_channels, width, batch_norm)
        _, _, c3, c4, c5 = self.backbone.stage_channels
        fc = scaled(fc_channels, width)
        self.fc = he_init(_fc_layers(c5, fc, fc_kernel, batch_norm, dropout))
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        if stride <= 16:
            self.upscore2 = BilinearUpsample(num_classes, 2)
            self.score_pool4 = _zero_conv1x1(c4, num_classes)
        if stride == 8:
            self.upscore_pool4 = BilinearUpsample(num_classes, 2)
            self.score_pool3 = _zero_conv1x1(c3, num_classes)
        self.upscore_final = BilinearUpsample(num_classes, stride, learnable=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        score = self.score_fr(self.fc(features.pool5))
        if self.stride <= 16:
            score = _crop_to(self.upscore2(score), features.pool4) + self.score_pool4(features.pool4)
        if self.stride == 8:
            score = _crop_to(self.upscore_pool4(score), features.pool3) + self.score_pool3(features.pool3)
        return _crop_to(self.upscore_final(score), x)


_TINY = {"num_classes": 3, "width": 1 / 16, "fc_channels": 1024, "batch_norm": True}


# One catalogue entry per stride, named as its conf/model file: the stride is what makes the variant.
@register_model("fcn32s", "segmentation", example_shape=(3, 37, 45), tiny_kwargs=_TINY)
def fcn32s(num_classes: int, **kwargs: Any) -> FCN:
    """FCN-32s: a single 32x upsampling of the fc7 scores."""
    return FCN(num_classes, stride=32, **kwargs)


@register_model("fcn16s", "segmentation", example_shape=(3, 37, 45), tiny_kwargs=_TINY)
def fcn16s(num_classes: int, **kwargs: Any) -> FCN:
    """FCN-16s: fc7 scores fused with pool4 scores, then 16x upsampling."""
    return FCN(num_classes, stride=16, **kwargs)


@register_model("fcn8s", "segmentation", example_shape=(3, 37, 45), tiny_kwargs=_TINY)
def fcn8s(num_classes: int, **kwargs: Any) -> FCN:
    """FCN-8s: fc7, pool4 and pool3 scores fused, then 8x upsampling."""
    return FCN(num_classes, stride=8, **kwargs)
