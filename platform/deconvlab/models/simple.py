"""Small baseline networks that carry the platform's tasks before the paper models come in."""

from __future__ import annotations

import torch
import torch.nn as nn

from deconvlab.models.catalogue import register_model


@register_model("residual_deblur_cnn", "restoration", example_shape=(1, 24, 24), tiny_kwargs={"width": 8, "depth": 3})
class ResidualDeblurCNN(nn.Module):
    """A stack of 3x3 convolutions (optionally dilated) that predicts the residual sharp - blurred.

    Predicting the residual starts the network at the identity (output = blurred input), so it can
    only improve on the input once trained, which is what a quickstart should show.

    Undoing a blur takes a wide filter: the Wiener inverse of a disk of radius 3 (SNR 30) keeps 5 % of its
    energy beyond 5 pixels from its centre, the reach of 5 plain convolutions. Dilated convolutions (Yu &
    Koltun 2016; Zhang et al.'s IRCNN 2017 deblurs with dilations 1-2-3-4-3-2-1) widen the field at the same
    parameters and MACs: with ``max_dilation`` > 1 the dilations double from the first convolution towards
    the middle ones and halve back to 1 at the last (:func:`dilation_ramp`).

    Args:
        in_channels: image channels (1 for grayscale).
        width: feature channels of the hidden layers.
        depth: number of convolutions.
        max_dilation: the largest dilation of the ramp; 1 gives plain convolutions.

    Attributes:
        receptive_field: the side of the input window one output pixel sees (2 * depth + 1 undilated).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, depth: int = 5, max_dilation: int = 1) -> None:
        super().__init__()
        dilations = dilation_ramp(depth, max_dilation)
        layers: list[nn.Module] = []
        channels = in_channels
        for d in dilations[:-1]:
            conv = _conv3x3(channels, width, d)
            # He initialisation keeps the activations' scale through the ReLUs; PyTorch's default shrinks it
            # layer by layer and a deep stack starts slowly (quickstart, epoch 3: 23.9 dB, 25.1 dB with He).
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = width
        last = _conv3x3(channels, in_channels, dilations[-1])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*layers, last)
        self.receptive_field = 1 + 2 * sum(dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def dilation_ramp(depth: int, max_dilation: int = 1) -> list[int]:
    """Dilations of ``depth`` 3x3 convolutions: 1, 2, 4, ... up to ``max_dilation`` towards the middle, then
    back down to 1 (depth 7, max 8: 1 2 4 8 4 2 1; max 4: 1 2 4 4 4 2 1), so the first and last layers see
    neighbouring pixels and no pixel of the field is skipped."""
    if depth < 1 or max_dilation < 1:
        raise ValueError(f"depth and max_dilation must be >= 1, got depth={depth}, max_dilation={max_dilation}")
    return [min(2 ** i, 2 ** (depth - 1 - i), max_dilation) for i in range(depth)]


def _conv3x3(cin: int, cout: int, dilation: int) -> nn.Conv2d:
    # Reflect padding: a blurred border continues the image, zeros would be an edge the net must undo.
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, padding_mode="reflect")


def _conv_block(conv: type[nn.Module], norm: type[nn.Module], cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(conv(cin, cout, 3, padding=1), norm(cout), nn.ReLU(inplace=True))


@register_model("tiny_encoder_decoder", "segmentation", example_shape=(3, 32, 32),
                tiny_kwargs={"num_classes": 3, "width": 4})
class TinyEncoderDecoder(nn.Module):
    """A two-level conv encoder with a transposed-convolution decoder: the smallest segmentation net.

    Args:
        num_classes: output classes.
        in_channels: image channels.
        width: channels of the first level (doubled at the second).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        self.encode = nn.Sequential(
            _conv_block(nn.Conv2d, nn.BatchNorm2d, in_channels, width), nn.MaxPool2d(2),
            _conv_block(nn.Conv2d, nn.BatchNorm2d, width, 2 * width),
        )
        self.upsample = nn.ConvTranspose2d(2 * width, width, kernel_size=2, stride=2)
        self.classify = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        features = self.upsample(self.encode(x))
        # Odd sizes lose a row/column to pooling: pad back so logits align with the labels.
        features = nn.functional.pad(features, (0, w - features.shape[-1], 0, h - features.shape[-2]))
        return self.classify(features)


@register_model("tiny_volume_net", "volumetric", example_shape=(2, 12, 12, 12),
                tiny_kwargs={"num_classes": 3, "width": 4})
class TinyVolumeNet(nn.Module):
    """Fully convolutional 3-D net (same-size output): the smallest volumetric segmenter.

    Args:
        num_classes: output classes.
        in_channels: MRI modalities.
        width: feature channels.
        depth: number of 3x3x3 convolutions before the classifier.
    """

    def __init__(self, num_classes: int, in_channels: int = 2, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        blocks = [_conv_block(nn.Conv3d, nn.BatchNorm3d, in_channels if i == 0 else width, width)
                  for i in range(depth)]
        self.features = nn.Sequential(*blocks)
        self.classify = nn.Conv3d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))
