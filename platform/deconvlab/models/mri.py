"""Patch CNNs for brain-tumour MRI: Havaei's two-pathway 2-D net, a DeepMedic-like dual-pathway 3-D net,
and "multiple networks": Havaei's input cascade of two 3-D nets and an ensemble of k nets.

All classify the centre voxel of a patch (``forward``: patch -> ``[B, K]``) and both can label every
voxel of a large tile in one pass (``dense_logits``: tile -> ``[B, K, ...]`` shrunk by ``margin`` on each
side) with exactly the numbers the patch classifier would give per voxel: every layer is a valid
(unpadded) convolution or a stride-1 pooling, so sliding the patch by one voxel slides the output
by one voxel. :mod:`deconvlab.volume.dense` builds whole-volume inference on ``dense_logits``.

Input layouts are those of :mod:`deconvlab.data.brats` (one tensor per the model contract):
TwoPathCNN ``[B, C*slices, S, S]``; DualPathwayCNN3d ``[B, 2C, S, S, S]`` = C normal-resolution
channels then C context channels (the ``f``-times larger region averaged down to ``S^3``);
CascadeCNN3d ``[B, C, P, P, P]``, one raw region large enough for both nets; an ensemble takes its
members' layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deconvlab.models.catalogue import register_model


def _squeeze_centre(logits: torch.Tensor) -> torch.Tensor:
    """``[B, K, 1, 1(, 1)]`` -> ``[B, K]`` (a centre-voxel label); larger outputs stay dense."""
    return logits.flatten(2)[..., 0] if all(s == 1 for s in logits.shape[2:]) else logits


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
        self.in_channels, self.num_classes = in_channels, num_classes
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
    """The pathway's layers with every 3^3 convolution dilated by ``dilation`` (filter rarefaction: the
    dense equivalent of running them on an ``dilation``-times subsampled input at every offset).

    Computed as exactly that: the input is split into its ``dilation^3`` sub-lattices (one batch item
    each), the ordinary pathway runs on them, and the outputs are interleaved back. Same arithmetic as
    a dilated convolution, but through the fast ordinary convolution kernels (CPU dilated 3-D
    convolutions fall back to a slow path). In training mode BatchNorm would take the padding of the
    split into its batch statistics, so there the dilated convolutions run directly.
    """
    f = dilation
    if blocks.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in blocks.modules()):
        # Training-mode BatchNorm takes batch statistics: the zero padding of the sub-lattice split
        # would enter them, so train through the dilated convolutions themselves.
        return _dilated_reference(blocks, x, f)
    batch, channels, *size = x.shape
    out_size = [n - 2 * len(blocks) * f for n in size]
    lattice = [-(-n // f) for n in size]  # sub-lattice side, after padding the input to a multiple of f
    x = F.pad(x, [p for n, q in zip(reversed(size), reversed(lattice), strict=True) for p in (0, q * f - n)])
    x = x.reshape(batch, channels, lattice[0], f, lattice[1], f, lattice[2], f)
    x = x.permute(0, 3, 5, 7, 1, 2, 4, 6).reshape(batch * f ** 3, channels, *lattice)
    y = blocks(x)
    width, *inner = y.shape[1:]
    y = y.reshape(batch, f, f, f, width, *inner).permute(0, 4, 5, 1, 6, 2, 7, 3)
    y = y.reshape(batch, width, *(q * f for q in inner))
    return y[:, :, :out_size[0], :out_size[1], :out_size[2]]


def _dilated_reference(blocks: nn.Sequential, x: torch.Tensor, dilation: int) -> torch.Tensor:
    """The pathway with every convolution dilated by ``dilation``, computed directly (no padding)."""
    for module in (m for block in blocks for m in block):
        if isinstance(module, nn.Conv3d):
            x = F.conv3d(x, module.weight, module.bias, dilation=dilation)
        else:
            x = module(x)
    return x


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
        context_channels: channels of the context input (default ``in_channels``); a cascade's second
            net reads the first net's probabilities in its normal pathway only.
    """

    dims = 3

    def __init__(self, in_channels: int = 2, num_classes: int = 5, widths: Sequence[int] = (16, 16, 24, 24),
                 context_factor: int = 3, fc_width: int = 64, dropout: float = 0.2,
                 context_channels: int | None = None) -> None:
        super().__init__()
        if context_factor < 1 or context_factor % 2 == 0:
            raise ValueError(f"context_factor must be odd (centred context blocks), got {context_factor}")
        self.in_channels, self.context_factor, self.num_classes = in_channels, context_factor, num_classes
        self.context_channels = in_channels if context_channels is None else context_channels
        self.num_layers = len(widths)
        self.normal = self._pathway(in_channels, widths)
        self.context = self._pathway(self.context_channels, widths) if context_factor > 1 else None
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
        if x.shape[1] != self.in_channels + (self.context_channels if self.context is not None else 0):
            raise ValueError(f"expected {self.in_channels} normal (+{self.context_channels} context) channels, "
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
        return self.dense_from(x, x[:, :self.context_channels])

    def dense_from(self, normal: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Dense logits from separate full-resolution inputs of the two pathways, centred on the same
        voxels (their sides may differ): the output covers every voxel both inputs can classify."""
        out = [n - 2 * self.num_layers for n in normal.shape[2:]]
        if self.context is not None:
            out = [min(o, c - 2 * self.margin) for o, c in zip(out, context.shape[2:], strict=True)]
        # Each pathway only sees what the output needs, so no voxel is computed and then cropped away.
        features = self.normal(_centre_crop(normal, [o + 2 * self.num_layers for o in out]))
        if self.context is not None:
            f = self.context_factor
            context = _centre_crop(context, [o + 2 * self.margin for o in out])
            # Average over f^3 blocks at every offset (stride 1) = the context patch's downsampling.
            features = torch.cat([features, _run_dilated(self.context, F.avg_pool3d(context, f, stride=1), f)], 1)
        return self.fuse(features)


def _check_patch(x: torch.Tensor, patch_size: int) -> None:
    if any(s != patch_size for s in x.shape[2:]):
        raise ValueError(f"patch nets classify the centre of a {patch_size}-voxel patch, "
                         f"got input {tuple(x.shape)}: "
                         f"set data.patch_size={patch_size} (dense_logits labels larger tiles)")


def _centre_crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    starts = [(s - t) // 2 for s, t in zip(x.shape[2:], shape, strict=True)]
    return x[(..., *(slice(a, a + t) for a, t in zip(starts, shape, strict=True)))]


# ------------------------------------------------------------------------------------ multiple networks
@register_model("cascade_deepmedic", "volumetric", example_shape=(2, 19, 19, 19),
                tiny_kwargs={"in_channels": 2, "num_classes": 5, "first_widths": [4, 4], "second_widths": [4, 4],
                             "fc_width": 8})
class CascadeCNN3d(nn.Module):
    """Havaei et al. 2017's input cascade on DeepMedic-like nets: the first net's class probabilities
    at every voxel of the second net's normal patch join the modalities as extra input channels of the
    second net's normal pathway (its context pathway reads the modalities only). Trained end to end.

    The input is one raw full-resolution region ``[B, C, P, P, P]`` (``P = patch_size``: data layout
    ``patch_dims=3, context_factor=1``) large enough for both nets; ``forward`` is ``dense_logits`` on it,
    so per-voxel and dense labelling agree by construction.

    Args:
        in_channels: modalities C.
        num_classes: label values K.
        first_widths, second_widths: 3^3 layer widths of each net (equal lengths: one patch side).
        context_factor: both nets' context downsampling factor (odd).
        fc_width, dropout: the nets' fusion layers.
    """

    dims = 3
    context_factor = 1  # the data layout: one raw region, no packed context channels

    def __init__(self, in_channels: int = 2, num_classes: int = 5, first_widths: Sequence[int] = (8, 8, 8, 8),
                 second_widths: Sequence[int] = (16, 16, 24, 24), context_factor: int = 3, fc_width: int = 64,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.first = DualPathwayCNN3d(in_channels, num_classes, first_widths, context_factor, fc_width, dropout)
        self.second = DualPathwayCNN3d(in_channels + num_classes, num_classes, second_widths, context_factor,
                                       fc_width, dropout, context_channels=in_channels)

    @property
    def margin(self) -> int:
        """The first net's margin around the second's normal patch, or the second's context margin."""
        return max(self.first.margin + self.second.num_layers, self.second.margin)

    @property
    def patch_size(self) -> int:
        return 2 * self.margin + 1

    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> ``[B, K, D-2m, H-2m, W-2m]`` (m = margin)."""
        out = [n - 2 * self.margin for n in x.shape[2:]]
        first_input = _centre_crop(x, [o + 2 * (self.second.num_layers + self.first.margin) for o in out])
        probabilities = torch.softmax(self.first.dense_logits(first_input), dim=1)
        normal = torch.cat([_centre_crop(x, probabilities.shape[2:]), probabilities], dim=1)
        return self.second.dense_from(normal, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, P, P, P]`` -> ``[B, K]``."""
        _check_patch(x, self.patch_size)
        return _squeeze_centre(self.dense_logits(x))


def _tiny_member() -> nn.Module:
    return DualPathwayCNN3d(2, 5, widths=[4, 4], context_factor=3, fc_width=8)


@register_model("deepmedic_ensemble", "volumetric", example_shape=(4, 5, 5, 5),
                tiny_kwargs={"member": _tiny_member, "size": 2})
class PatchNetEnsemble(nn.Module):
    """``size`` patch nets of one layout (independently initialised) whose class probabilities are averaged.

    The output is the log of the mean probability, so ``softmax`` of it is the ensemble's probability
    and cross-entropy on it trains the ensemble as one predictor.

    Args:
        member: builds one member (a Hydra ``_partial_: true`` model config).
        size: number of members.
    """

    def __init__(self, member: Callable[[], nn.Module], size: int = 3) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"an ensemble needs at least one member, got size={size}")
        self.members = nn.ModuleList(member() for _ in range(size))
        first = self.members[0]
        self.dims, self.num_classes, self.in_channels = first.dims, first.num_classes, first.in_channels
        self.patch_size, self.margin = first.patch_size, first.margin
        self.context_factor = getattr(first, "context_factor", 1)

    def _average(self, logits: list[torch.Tensor]) -> torch.Tensor:
        log_probabilities = torch.stack([torch.log_softmax(x, dim=1) for x in logits])
        return torch.logsumexp(log_probabilities, dim=0) - math.log(len(logits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._average([member(x) for member in self.members])

    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._average([member.dense_logits(x) for member in self.members])


# ---------------------------------------------------------------------- catalogue entries with variants
# TwoPathCNN and DualPathwayCNN3d have several configurations in conf/model, so each configuration gets a
# builder named as its conf file; the builder's default is what makes the variant.
_TINY_TWOPATH = {"num_classes": 5, "local_width": 4, "global_width": 8}
_TINY_DEEPMEDIC = {"in_channels": 2, "num_classes": 5, "fc_width": 8}


@register_model("twopath_cnn", "volumetric", example_shape=(2, 33, 33), tiny_kwargs=_TINY_TWOPATH)
def twopath_cnn(in_channels: int = 2, **kwargs: Any) -> TwoPathCNN:
    """TwoPathCNN on one axial slice of every modality (FLAIR + T1c: 2 channels)."""
    return TwoPathCNN(in_channels, **kwargs)


@register_model("twopath_cnn_2p5d", "volumetric", example_shape=(6, 33, 33), tiny_kwargs=_TINY_TWOPATH)
def twopath_cnn_2p5d(in_channels: int = 6, **kwargs: Any) -> TwoPathCNN:
    """TwoPathCNN on 2.5-D patches: 3 neighbouring axial slices x 2 modalities as channels."""
    return TwoPathCNN(in_channels, **kwargs)


@register_model("deepmedic", "volumetric", example_shape=(4, 9, 9, 9),
                tiny_kwargs={**_TINY_DEEPMEDIC, "widths": [4, 4, 4, 4]})
def deepmedic(widths: Sequence[int] = (16, 16, 24, 24), **kwargs: Any) -> DualPathwayCNN3d:
    """The DeepMedic-like net with four 3^3 layers per pathway: a 9^3 patch."""
    return DualPathwayCNN3d(widths=widths, **kwargs)


@register_model("deepmedic_p7", "volumetric", example_shape=(4, 7, 7, 7),
                tiny_kwargs={**_TINY_DEEPMEDIC, "widths": [4, 4, 4]})
def deepmedic_p7(widths: Sequence[int] = (16, 16, 24), **kwargs: Any) -> DualPathwayCNN3d:
    """The DeepMedic-like net with three 3^3 layers per pathway: a 7^3 patch."""
    return DualPathwayCNN3d(widths=widths, **kwargs)
