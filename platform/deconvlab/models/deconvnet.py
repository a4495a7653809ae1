"""DeconvNet (Noh, Hong & Han, "Learning Deconvolution Network for Semantic Segmentation", ICCV 2015).

A VGG-16 encoder and its mirror image as decoder: each 2x2 max-pool is undone by an unpooling layer and
each conv by a "deconvolution" (transposed conv) with BatchNorm. Noh et al. unpool with the encoder's
*switches*: every value goes back to the position its max-pool took it from, the rest stays zero, which
recovers the fine structure that pooling threw away. The ``unpool="naive"`` option replaces that with the
first proposal the lecture mentions, copying each pixel into a 2x2 block (nearest-neighbour upsampling),
everything else equal: the unpooling ablation is one config key, ``model.unpool``.

For any input size the fc6 layer uses same padding (Noh et al. use a valid 7x7 conv down to 1x1 on
224x224 crops, and a 7x7 "deconv-fc6" back up): the net then runs on whole, non-square CamVid frames.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.models.catalogue import register_model
from deconvlab.models.vgg import VGG16, he_init, scaled

# The decoder's output channels per stage, from the coarsest (undoing pool5) to the finest (pool1).
DECODER_STAGES: tuple[tuple[int, ...], ...] = ((512, 512, 512), (512, 512, 256), (256, 256, 128),
                                               (128, 64), (64, 64))
UNPOOL_MODES = ("switches", "naive")


def max_unpool(x: torch.Tensor, switches: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Put every value back at its max-pool's argmax position (``switches``), zeros elsewhere."""
    return F.max_unpool2d(x, switches, kernel_size=2, stride=2, output_size=size)


def naive_unpool(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Copy every value into a 2x2 block, then trim to ``size`` (a ``ceil_mode`` pool of odd input)."""
    return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)[..., : size[0], : size[1]]


class Unpool(nn.Module):
    """2x2 unpooling, either with the encoder's switches or by copying (see module doc)."""

    def __init__(self, mode: str = "switches") -> None:
        super().__init__()
        if mode not in UNPOOL_MODES:
            raise ValueError(f"unpool must be one of {UNPOOL_MODES}, got {mode!r} (config key model.unpool)")
        self.mode = mode

    def forward(self, x: torch.Tensor, switches: torch.Tensor | None, size: torch.Size) -> torch.Tensor:
        if self.mode == "naive":
            return naive_unpool(x, size)
        if switches is None:
            raise ValueError("switch unpooling needs the encoder's pooling switches")
        return max_unpool(x, switches, size)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def deconv_block(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Transposed conv (same size) -> BatchNorm -> ReLU, one layer of Noh et al.'s decoder."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _fc_block(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


@register_model("deconvnet", "segmentation", example_shape=(3, 37, 45),
                tiny_kwargs={"num_classes": 3, "width": 1 / 16, "fc_channels": 1024})
class DeconvNet(nn.Module):
    """Encoder-decoder segmentation net with switch (or naive) unpooling; logits of the input's size.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        width: channel multiplier for encoder, fc layers and decoder.
        unpool: "switches" (Noh et al.) or "naive" (2x2 copies), the ablation of issue 13.
        batch_norm: BatchNorm in the encoder too (the decoder always has it, as in the paper).
        fc_channels: channels of fc6/fc7 before the width multiplier (4096 in the paper).
        fc_kernel: fc6's and deconv-fc6's kernel size (7 in the paper).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0, unpool: str = "switches",
                 batch_norm: bool = True, fc_channels: int = 4096, fc_kernel: int = 7) -> None:
        super().__init__()
        self.encoder = VGG16(in_channels, width, batch_norm)
        c5, fc = self.encoder.out_channels, scaled(fc_channels, width)
        self.fc = nn.Sequential(_fc_block(c5, fc, fc_kernel), _fc_block(fc, fc, 1))
        self.deconv_fc = deconv_block(fc, c5, fc_kernel)
        self.unpool = Unpool(unpool)
        self.decoder = nn.ModuleList()
        channels = c5
        for stage in DECODER_STAGES:
            layers = []
            for out in stage:
                layers.append(deconv_block(channels, scaled(out, width)))
                channels = scaled(out, width)
            self.decoder.append(nn.Sequential(*layers))
        he_init(self)  # the encoder was already; the classifier keeps PyTorch's smaller default init
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    @torch.no_grad()
    def init_class_prior(self, frequencies: torch.Tensor) -> None:
        """Start the classifier at the class frequencies: zero weights, bias = log frequency.

        From PyTorch's default start the net spends its first ~1,000 steps on shapes learning only that most
        pixels are background (the 1x1 classifier's bias moves by the learning rate per step); started at the
        prior, its first steps go to the objects (docs/results.md, DeconvNet).
        """
        nn.init.zeros_(self.classifier.weight)
        self.classifier.bias.copy_(frequencies.to(self.classifier.bias).log())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x, return_switches=self.unpool.mode == "switches")
        y = self.deconv_fc(self.fc(features.pool5))
        for i, stage in enumerate(self.decoder):
            level = len(self.decoder) - 1 - i  # stage i undoes pool5, pool4, ..., pool1
            switches = features.switches[level] if features.switches else None
            y = stage(self.unpool(y, switches, features.sizes[level]))
        return self.classifier(y)
