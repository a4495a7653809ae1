"""Patch CNNs for brain-tumour MRI: Havaei's two-pathway 2-D net and a DeepMedic-like dual-pathway 3-D net.

Both classify the centre voxel of a patch (``forward``: patch -> ``[B, K]``) and both can label every
voxel of a large tile in one pass (``dense_logits``: tile -> ``[B, K, ...]`` shrunk by ``margin`` on each
side) with exactly the numbers the patch classifier would give per voxel: every layer is a valid
(unpadded) convolution or a stride-1 pooling, so sliding the patch by one voxel slides the output
by one voxel. :mod:`deconvlab.inference` builds whole-volume inference on ``dense_logits``.

Input layouts are those of :mod:`deconvlab.data.brats` (one tensor per the model contract):
TwoPathCNN ``[B, C*slices, S, S]``; DualPathwayCNN3d ``[B, 2C, S, S, S]`` = C normal-resolution
channels then C context channels (the ``f``-times larger region averaged down to ``S^3``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.models.registry import register_model


def _squeeze_centre(logits: torch.Tensor) -> torch.Tensor:
    """``[B, K, 1, 1(, 1)]`` -> ``[B, K]`` (a centre-voxel label); larger outputs stay dense."""
    return logits.flatten(2)[..., 0] if all(s == 1 for s in logits.shape[2:]) else logits


@register_model(task="volumetric", example_shape=(2, 33, 33),
                tiny_kwargs={"in_channels": 2, "num_classes": 5, "local_width": 4, "global_width": 8})
class TwoPathCNN(nn.Module):
    """Havaei et al. 2017's TwoPathCNN: a local pathway (7x7 conv, 4x4 max-pool, 3x3 conv, 2x2 max-pool,
    all stride 1) and a global pathway (one 13x13 conv) side by side on a 33x33 patch, concatenated and
    classified by a 21x21 convolution (a fully connected layer that stays convolutional).

    Havaei used maxout units; ReLU keeps this small (the paper's ablation found them close).
    2.5-D: give the neighbouring slices as extra channels (``in_channels = modalities * slices``).

    Args:
        in_channels: input channels (modalities x slices).
        num_classes: label values.
        local_width, global_width: feature maps per pathway (paper: 64 and 160).
        dropout: dropout before the classifier.
    """

    patch_size = 33
    dims = 2

    def __init__(self, in_channels: int = 2, num_classes: int = 5, local_width: int = 64,
                 global_width: int = 160, dropout: float = 0.2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.local = nn.Sequential(
            nn.Conv2d(in_channels, local_width, 7), nn.ReLU(inplace=True), nn.MaxPool2d(4, stride=1),
            nn.Conv2d(local_width, local_width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2, stride=1))
        self.global_ = nn.Sequential(nn.Conv2d(in_channels, global_width, 13), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(local_width + global_width, num_classes, 21)

    @property
    def margin(self) -> int:
        return self.patch_size // 2

    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, K, H-32, W-32]``."""
        return self.classifier(self.dropout(torch.cat([self.local(x), self.global_(x)], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, 33, 33]`` -> ``[B, K]`` (``dense_logits`` labels larger inputs)."""
        _check_patch(x, self.patch_size)
        return _squeeze_centre(self.dense_logits(x))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # BatchNorm in eval mode and PReLU are per-voxel maps: dense and per-patch outputs stay equal.
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3), nn.BatchNorm3d(out_channels),
                         nn.PReLU(out_channels))


def _run_dilated(blocks: nn.Sequential, x: torch.Tensor, dilation: int) -> torch.Tensor:
    """The pathway's layers with every 3^3 convolution dilated (filter rarefaction, the dense
    equivalent of running them on an ``dilation``-times subsampled input at every offset)."""
    for conv, norm, act in blocks:
        x = act(norm(F.conv3d(x, conv.weight, conv.bias, dilation=dilation)))
    return x


@register_model(task="volumetric", example_shape=(4, 9, 9, 9),
                tiny_kwargs={"in_channels": 2, "num_classes": 5, "widths": [4, 4, 4, 4], "fc_width": 8})
class DualPathwayCNN3d(nn.Module):
    """A DeepMedic-like 3-D patch CNN (Kamnitsas et al. 2017): a normal-resolution pathway and a
    context pathway on an ``f``-times downsampled, ``f``-times larger region, fused by 1x1x1 layers.

    ``L = len(widths)`` 3^3 valid convolutions per pathway make the patch side ``S = 2L + 1`` for both
    inputs, so they pack as channels; the context covers ``f * S`` voxels (DeepMedic: 8 layers, f=3).

    Args:
        in_channels: modalities C (the input has 2C channels, C with ``context_factor=1``).
        num_classes: label values.
        widths: feature maps of each 3^3 layer (paper: 30, 30, 40, 40, 40, 40, 50, 50).
        context_factor: odd downsampling factor of the context pathway; 1 = no context pathway.
        fc_width: width of the two 1x1x1 fusion layers (paper: 150).
        dropout: dropout in the fusion layers.
    """

    dims = 3

    def __init__(self, in_channels: int = 2, num_classes: int = 5, widths: Sequence[int] = (16, 16, 24, 24),
                 context_factor: int = 3, fc_width: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        if context_factor < 1 or context_factor % 2 == 0:
            raise ValueError(f"context_factor must be odd (centred context blocks), got {context_factor}")
        self.in_channels, self.context_factor, self.num_classes = in_channels, context_factor, num_classes
        self.num_layers = len(widths)
        self.normal = self._pathway(in_channels, widths)
        self.context = self._pathway(in_channels, widths) if context_factor > 1 else None
        fused = widths[-1] * (2 if self.context is not None else 1)
        self.fuse = nn.Sequential(nn.Conv3d(fused, fc_width, 1), nn.PReLU(fc_width), nn.Dropout3d(dropout),
                                  nn.Conv3d(fc_width, fc_width, 1), nn.PReLU(fc_width), nn.Dropout3d(dropout),
                                  nn.Conv3d(fc_width, num_classes, 1))

    @staticmethod
    def _pathway(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
        pairs = zip([in_channels, *widths], widths, strict=False)
        return nn.Sequential(*(_conv_block(c_in, c_out) for c_in, c_out in pairs))

    @property
    def patch_size(self) -> int:
        return 2 * self.num_layers + 1

    @property
    def margin(self) -> int:
        """Half the receptive field in full-resolution voxels (the context region's half side)."""
        return (self.context_factor * self.patch_size) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 2C, S, S, S]`` (normal + context channels) -> ``[B, K]`` for ``S = patch_size``."""
        _check_patch(x, self.patch_size)
        if x.shape[1] != self.in_channels * (2 if self.context is not None else 1):
            raise ValueError(f"expected {self.in_channels} normal (+{self.in_channels} context) channels, "
                             f"got {x.shape[1]}")
        features = self.normal(x[:, :self.in_channels])
        if self.context is not None:
            context = self.context(x[:, self.in_channels:])
            # Nearest upsampling back to full resolution, centre crop to the normal pathway's output.
            context = F.interpolate(context, scale_factor=self.context_factor, mode="nearest")
            features = torch.cat([features, _centre_crop(context, features.shape[2:])], dim=1)
        return _squeeze_centre(self.fuse(features))

    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution tile ``[B, C, D, H, W]`` -> logits ``[B, K, D-2m, H-2m, W-2m]`` (m = margin),
        each voxel's logits equal to ``forward`` on the patch (and context) centred on it."""
        out_shape = [s - 2 * self.margin for s in x.shape[2:]]
        features = _centre_crop(self.normal(x), out_shape)
        if self.context is not None:
            f = self.context_factor
            # Average over f^3 blocks at every offset (stride 1) = the context patch's downsampling.
            pooled = F.avg_pool3d(x, f, stride=1)
            features = torch.cat([features, _run_dilated(self.context, pooled, f)], dim=1)
        return self.fuse(features)


def _check_patch(x: torch.Tensor, patch_size: int) -> None:
    if any(s != patch_size for s in x.shape[2:]):
        raise ValueError(f"patch nets classify the centre of a {patch_size}-voxel patch, "
                         f"got input {tuple(x.shape)}: "
                         f"set data.patch_size={patch_size} (dense_logits labels larger tiles)")


def _centre_crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    starts = [(s - t) // 2 for s, t in zip(x.shape[2:], shape, strict=True)]
    return x[(..., *(slice(a, a + t) for a, t in zip(starts, shape, strict=True)))]
