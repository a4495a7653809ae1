"""VGG-16's convolutional layers (Simonyan & Zisserman), the encoder of FCN and DeconvNet.

Written here rather than taken from torchvision: the segmentation nets need a width multiplier for CPU
budgets, optional BatchNorm, the intermediate pool3/pool4/pool5 maps (FCN's skips) and the max-pooling
switches (DeconvNet's unpooling). Pooling uses ``ceil_mode=True`` so that any input size works: a map of
odd size keeps its last row/column in a partial window instead of dropping it, and every pooled grid
stays aligned with the input (pixel j of a stride-s map is centred on input pixel s*j + (s-1)/2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

# Output channels of VGG-16's 13 convolutions, grouped by the five stages that each end in a 2x2 pool.
VGG16_STAGES: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
                                             (512, 512, 512))


def scaled(channels: int, width: float) -> int:
    """``channels * width`` rounded, never below 1: the width multiplier used by every model here."""
    return max(1, round(channels * width))


def conv_block(in_channels: int, out_channels: int, batch_norm: bool, kernel_size: int = 3) -> nn.Sequential:
    """Conv (same padding) -> optional BatchNorm -> ReLU; the conv has no bias when BatchNorm follows."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                         bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal init of every conv and transposed conv, BatchNorm to identity; returns ``model``.

    PyTorch's default conv init shrinks the signal by about 6x per conv+ReLU: through VGG's 13 layers
    (and DeconvNet's 30) the logits of an untrained net are then constant, and from-scratch training
    stalls. Call it before any layer is given a special init (zero scores, bilinear kernels).
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # ConvTranspose2d stores [in, out, k, k]: its fan_in as PyTorch counts it is the layer's fan_out.
            mode = "fan_in" if isinstance(module, nn.ConvTranspose2d) else "fan_out"
            nn.init.kaiming_normal_(module.weight, mode=mode, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


@dataclass
class VGGFeatures:
    """What :class:`VGG16` returns.

    Attributes:
        pools: the output of each of the five pooling layers, pool1 (stride 2) to pool5 (stride 32).
        switches: for each pool, the flat argmax index of every pooled value (``MaxPool2d`` indices);
            empty unless asked for.
        sizes: the spatial size of each pool's input, which unpooling needs to undo ``ceil_mode``.
    """

    pools: list[torch.Tensor]
    switches: list[torch.Tensor] = field(default_factory=list)
    sizes: list[torch.Size] = field(default_factory=list)

    @property
    def pool3(self) -> torch.Tensor:
        return self.pools[2]

    @property
    def pool4(self) -> torch.Tensor:
        return self.pools[3]

    @property
    def pool5(self) -> torch.Tensor:
        return self.pools[4]


class VGG16(nn.Module):
    """The 13 convolutions and 5 max-pools of VGG-16 (no classifier).

    Args:
        in_channels: channels of the input image.
        width: multiplier on every layer's channel count (0.25 gives 16..128 channels).
        batch_norm: put BatchNorm after every convolution (VGG-16-BN); needed to train from scratch
            in a CPU budget, since no pretrained weights are downloaded here.
    """

    def __init__(self, in_channels: int = 3, width: float = 1.0, batch_norm: bool = False) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        channels = in_channels
        for stage in VGG16_STAGES:
            convs = []
            for out in stage:
                convs.append(conv_block(channels, scaled(out, width), batch_norm))
                channels = scaled(out, width)
            self.stages.append(nn.Sequential(*convs))
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True, return_indices=True)
        self.stage_channels = [scaled(stage[-1], width) for stage in VGG16_STAGES]
        he_init(self)

    @property
    def out_channels(self) -> int:
        return self.stage_channels[-1]

    def forward(self, x: torch.Tensor, return_switches: bool = False) -> VGGFeatures:
        features = VGGFeatures(pools=[])
        for stage in self.stages:
            x = stage(x)
            size = x.shape[-2:]
            x, switches = self.pool(x)
            features.pools.append(x)
            features.sizes.append(size)
            if return_switches:
                features.switches.append(switches)
        return features
