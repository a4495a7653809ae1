"""Small baseline networks that carry the platform's tasks before the paper models come in."""

from __future__ import annotations

import torch
import torch.nn as nn

from deconvlab.models.catalogue import register_model


@register_model("residual_deblur_cnn", "restoration", example_shape=(1, 24, 24), tiny_kwargs={"width": 8, "depth": 3})
class ResidualDeblurCNN(nn.Module):
    """A plain stack of 3x3 convolutions that predicts the residual sharp - blurred.

    Predicting the residual starts the network at the identity (output = blurred input), so it can
    only improve on the input once trained, which is what a quickstart should show.

    Args:
        in_channels: image channels (1 for grayscale).
        width: feature channels of the hidden layers.
        depth: number of convolutions (receptive field 2 * depth + 1).
    """

    def __init__(self, in_channels: int = 1, width: int = 32, depth: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth - 1):
            layers += [nn.Conv2d(channels, width, 3, padding=1, padding_mode="reflect"), nn.ReLU(inplace=True)]
            channels = width
        last = nn.Conv2d(channels, in_channels, 3, padding=1, padding_mode="reflect")
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.body = nn.Sequential(*layers, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


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
