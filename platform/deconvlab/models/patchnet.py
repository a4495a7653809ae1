"""Per-pixel patch classification, naive and dense (the step before fully convolutional nets).

The naive approach labels every pixel by cutting out the P x P patch around it and running a small
classifier (valid convs and 2x2 max-pools down to a single 1x1 output) on that patch: one forward pass per
pixel, most of it recomputing what the neighbouring patches already computed.

The same classifier, with the same weights, can be run *as a convolution over the whole image*
(Sermanet et al.'s OverFeat dense evaluation): the pools keep stride 1 and every later layer is dilated
by the pooling stride it skipped ("filter rarefaction", equivalent to shift-and-stitch), so one pass
yields the exact per-pixel-patch labels for every pixel at once. :meth:`PatchNet.forward` is that dense
evaluation, optionally averaged over several input scales; :meth:`PatchNet.predict_per_pixel` is the
naive loop, kept for comparison and for the test that both agree.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.models.catalogue import register_model
from deconvlab.models.vgg import he_init, scaled


@register_model("patchnet", "segmentation", example_shape=(3, 23, 29),
                tiny_kwargs={"num_classes": 3, "channels": (4, 8), "hidden": 16})
class PatchNet(nn.Module):
    """A patch classifier evaluated densely (and, for comparison, patch by patch).

    Layers: ``len(channels)`` stages of 3x3 valid conv -> BatchNorm -> ReLU -> 2x2 max-pool, then the
    "fully connected" layers as a 3x3 valid conv to ``hidden`` units and a 1x1 conv to the classes.
    The patch size is the receptive field this gives (18 for two stages, 38 for three).

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        channels: output channels of the conv stages (before the width multiplier).
        hidden: units of the hidden fully connected layer (before the width multiplier).
        width: channel multiplier.
        scales: input scales of the dense evaluation; the logits of each are resized to the input's size
            and averaged. (1.0,) is the plain patch classifier.
        padding_mode: how the image is extended so that border pixels get a full patch.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128),
                 hidden: int = 256, width: float = 1.0, scales: tuple[float, ...] = (1.0,),
                 padding_mode: str = "replicate") -> None:
        super().__init__()
        widths = [scaled(c, width) for c in channels]
        self.convs = nn.ModuleList(nn.Conv2d(c_in, c_out, 3, bias=False)
                                   for c_in, c_out in zip([in_channels, *widths], widths, strict=False))
        self.norms = nn.ModuleList(nn.BatchNorm2d(c) for c in widths)
        self.fc = nn.Conv2d(widths[-1], scaled(hidden, width), 3)
        self.fc_norm = nn.BatchNorm2d(scaled(hidden, width))
        he_init(self)
        self.score = nn.Conv2d(scaled(hidden, width), num_classes, 1)
        self.scales, self.padding_mode = tuple(scales), padding_mode
        self.patch_size = self._receptive_field()

    def _receptive_field(self) -> int:
        field, jump = 1, 1
        for _ in self.convs:
            field += 2 * jump  # the 3x3 conv
            field += jump  # the 2x2 pool
            jump *= 2
        return field + 2 * jump  # the 3x3 fc layer

    def _run(self, x: torch.Tensor, dense: bool) -> torch.Tensor:
        """The classifier on patches (``dense=False``) or densely on a padded image (``dense=True``)."""
        dilation = 1
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = F.relu(norm(F.conv2d(x, conv.weight, dilation=dilation)))
            if dense:
                x = F.max_pool2d(x, 2, stride=1, dilation=dilation)
                dilation *= 2
            else:
                x = F.max_pool2d(x, 2)
        x = F.relu(self.fc_norm(F.conv2d(x, self.fc.weight, self.fc.bias, dilation=dilation)))
        return self.score(x)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        before = (self.patch_size - 1) // 2
        after = self.patch_size - 1 - before
        return F.pad(x, (before, after, before, after), mode=self.padding_mode)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, H, W] of the patch classifier for every pixel, in one convolutional pass."""
        return self._run(self._pad(x), dense=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        outputs = []
        for scale in self.scales:
            if scale == 1.0:
                outputs.append(self.dense(x))
                continue
            resized = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            logits = self.dense(resized)
            outputs.append(F.interpolate(logits, size=size, mode="bilinear", align_corners=False))
        return torch.stack(outputs).mean(dim=0)

    def classify_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """Logits [N, K] of N patches [N, C, P, P]."""
        if patches.shape[-2:] != (self.patch_size, self.patch_size):
            p = self.patch_size
            raise ValueError(f"patches must be {p}x{p}, got shape {tuple(patches.shape)}")
        return self._run(patches, dense=False).flatten(1)

    def predict_per_pixel(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, H, W] by classifying each pixel's patch on its own (the naive, slow way).

        Patches are cut and classified one image row at a time to bound memory; each patch is still an
        independent forward pass of the classifier.
        """
        padded, p = self._pad(x), self.patch_size
        batch, channels, height, width = x.shape
        rows = []
        for y in range(height):
            strip = padded[:, :, y : y + p].unfold(-1, p, 1)  # [B, C, P, W, P]
            patches = strip.permute(0, 3, 1, 2, 4).reshape(batch * width, channels, p, p)
            rows.append(self.classify_patches(patches).reshape(batch, width, -1))
        return torch.stack(rows, dim=1).permute(0, 3, 1, 2)
