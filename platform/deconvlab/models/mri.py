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
        extra_channels: channels a cascade joins to the net (another net's class probabilities):
            at its input (counted in ``in_channels``), after the local pathway's first block
            (``extra_at="local"``) or before the classifier (``"output"``).
        extra_at: "local" or "output" (see ``extra_channels``).
    """

    patch_size = 33
    dims = 2
    # Where joined maps sit, per extra_at: (side shrink from the input, offset of their first voxel in the
    # input). The local pathway's first block (7x7 conv, 4x4 pool) is 10 voxels wide, so its maps are
    # centred between voxels: they are taken at the left-of-centre voxel (offset 4).
    JOIN_POINTS = {"input": (0, 0), "local": (9, 4), "output": (12, 6)}

    def __init__(self, in_channels: int = 2, num_classes: int = 5, local_width: int = 64,
                 global_width: int = 160, dropout: float = 0.2, extra_channels: int = 0,
                 extra_at: str = "input") -> None:
        super().__init__()
        if extra_at not in self.JOIN_POINTS:
            raise ValueError(f"extra_at must be one of {sorted(self.JOIN_POINTS)}, got {extra_at!r}")
        self.in_channels, self.num_classes = in_channels, num_classes
        self.extra_at = extra_at
        local_extra = extra_channels if extra_at == "local" else 0
        output_extra = extra_channels if extra_at == "output" else 0
        # One Sequential (the checkpoints' keys): indices 0-2 are the first block, 3-5 the second.
        self.local = nn.Sequential(
            nn.Conv2d(in_channels, local_width, 7), nn.ReLU(inplace=True), nn.MaxPool2d(4, stride=1),
            nn.Conv2d(local_width + local_extra, local_width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2, stride=1))
        self.global_ = nn.Sequential(nn.Conv2d(in_channels, global_width, 13), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(local_width + global_width + output_extra, num_classes, 21)

    @property
    def margin(self) -> int:
        return self.patch_size // 2

    def output_layers(self) -> list[nn.Module]:
        return [self.classifier]

    def dense_logits(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, K, H-32, W-32]``; ``extra``: the maps joined at ``extra_at`` ("local":
        ``[B, E, H-9, W-9]``, "output": ``[B, E, H-12, W-12]``; at the input they are part of ``x``)."""
        local = self.local[:3](x)
        if extra is not None and self.extra_at == "local":
            local = torch.cat([local, extra], dim=1)
        features = torch.cat([self.local[3:](local), self.global_(x)], dim=1)
        if extra is not None and self.extra_at == "output":
            features = torch.cat([features, extra], dim=1)
        return self.classifier(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, 33, 33]`` -> ``[B, K]`` (``dense_logits`` labels larger inputs)."""
        _check_patch(x, self.patch_size)
        return _squeeze_centre(self.dense_logits(x))


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    # BatchNorm in eval mode and PReLU are per-voxel maps: dense and per-patch outputs stay equal.
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3), nn.BatchNorm3d(out_channels),
                         nn.PReLU(out_channels))


class Pathway(nn.Sequential):
    """A DeepMedic pathway: 3^3 valid convolution blocks, with DeepMedic v2's residual connections.

    At each (1-based) layer in ``residual_at`` the output of the layer two before (its channels zero-padded
    to the width, its border cropped to the smaller side) is added to the layer's output (Kamnitsas et al.
    2017: residuals at layers 4, 6 and 8). ``forward(x, dilation)`` dilates every convolution (the dense
    context pathway); the crop grows with it.
    """

    def __init__(self, in_channels: int, widths: Sequence[int], residual_at: Sequence[int] = ()) -> None:
        pairs = zip([in_channels, *widths], widths, strict=False)
        super().__init__(*(_conv_block(c_in, c_out) for c_in, c_out in pairs))
        bad = [i for i in residual_at if not 3 <= i <= len(widths)]
        if bad:
            raise ValueError(f"residual_at: layers {bad} have no layer two before them (1-based, 3..{len(widths)})")
        narrowing = [i for i in residual_at if widths[i - 1] < widths[i - 3]]
        if narrowing:
            raise ValueError(f"residual_at: layers {narrowing} are narrower than the layer two before them")
        self.residual_at = tuple(residual_at)

    def forward(self, x: torch.Tensor, dilation: int = 1) -> torch.Tensor:  # type: ignore[override]
        outputs = [x]
        for layer, block in enumerate(self, start=1):
            x = _run_block(block, x, dilation)
            if layer in self.residual_at:
                earlier = _centre_crop(outputs[layer - 2], x.shape[2:])
                x = x + F.pad(earlier, [0] * 6 + [0, x.shape[1] - earlier.shape[1]])
            outputs.append(x)
        return x


def _run_block(block: nn.Sequential, x: torch.Tensor, dilation: int) -> torch.Tensor:
    conv, *rest = block
    x = F.conv3d(x, conv.weight, conv.bias, dilation=dilation) if dilation > 1 else conv(x)
    for module in rest:
        x = module(x)
    return x


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
    padded = any(n % f for n in x.shape[2:])
    if padded and blocks.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in blocks.modules()):
        # Training-mode BatchNorm takes batch statistics: the zero padding of the sub-lattice split
        # would enter them, so train through the dilated convolutions themselves. (Without padding the
        # split's outputs are exactly the dilated convolution's, so their statistics are too.)
        return blocks(x, f)
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
        residual_at: 1-based layers of both pathways that add the output of the layer two before
            (:class:`Pathway`; DeepMedic v2: 4, 6, 8).
    """

    dims = 3

    def __init__(self, in_channels: int = 2, num_classes: int = 5, widths: Sequence[int] = (16, 16, 24, 24),
                 context_factor: int = 3, fc_width: int = 64, dropout: float = 0.2,
                 context_channels: int | None = None, residual_at: Sequence[int] = ()) -> None:
        super().__init__()
        if context_factor < 1 or context_factor % 2 == 0:
            raise ValueError(f"context_factor must be odd (centred context blocks), got {context_factor}")
        self.in_channels, self.context_factor, self.num_classes = in_channels, context_factor, num_classes
        self.context_channels = in_channels if context_channels is None else context_channels
        self.num_layers = len(widths)
        self.normal = Pathway(in_channels, widths, residual_at)
        self.context = Pathway(self.context_channels, widths, residual_at) if context_factor > 1 else None
        fused = widths[-1] * (2 if self.context is not None else 1)
        self.fuse = nn.Sequential(nn.Conv3d(fused, fc_width, 1), nn.PReLU(fc_width), nn.Dropout3d(dropout),
                                  nn.Conv3d(fc_width, fc_width, 1), nn.PReLU(fc_width), nn.Dropout3d(dropout),
                                  nn.Conv3d(fc_width, num_classes, 1))

    @property
    def patch_size(self) -> int:
        return 2 * self.num_layers + 1

    def output_layers(self) -> list[nn.Module]:
        return [self.fuse[-1]]

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


class _CascadeOfTwo(nn.Module):
    """What Havaei's cascades share: a patch as wide as the cascade's margin needs, and the second net's
    classifier as the output layer (two-phase training re-trains only that one)."""

    second: nn.Module

    @property
    def patch_size(self) -> int:
        return 2 * self.margin + 1

    def output_layers(self) -> list[nn.Module]:
        return self.second.output_layers()


# ------------------------------------------------------------------------------------ multiple networks
@register_model("cascade_deepmedic", "volumetric", example_shape=(2, 19, 19, 19),
                tiny_kwargs={"in_channels": 2, "num_classes": 5, "first_widths": [4, 4], "second_widths": [4, 4],
                             "fc_width": 8})
class CascadeCNN3d(_CascadeOfTwo):
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


@register_model("deepmedic_v2", "volumetric", example_shape=(2, 21, 21, 21),
                tiny_kwargs={"in_channels": 2, "num_classes": 5, "widths": [4, 4, 4], "residual_at": [3],
                             "fc_width": 8, "segment": 3})
class SegmentDeepMedic(nn.Module):
    """A DeepMedic (:class:`DualPathwayCNN3d`) that reads one raw full-resolution region and trains on
    *segments*: a region ``segment - 1`` voxels wider than its patch labels the ``segment^3`` block around
    its centre in one forward pass (DeepMedic's training on 25^3 segments: 9^3 labels each), instead of
    one voxel per patch.

    Every output voxel's context is the pooled region centred on it (the dense dilated context pathway,
    as :meth:`DualPathwayCNN3d.dense_logits`), so training, dense inference and per-voxel classification
    compute the same function. ``forward`` on a ``patch_size`` region gives ``[B, K]``, on a wider one the
    dense ``[B, K, ...]`` block. Defaults are the paper's shape: 8 layers of 30-50, residual connections
    at layers 4, 6, 8, context at factor 3, two 150-wide fusion layers.

    Args:
        in_channels: modalities C.
        num_classes: label values K.
        widths, context_factor, fc_width, dropout, residual_at: see :class:`DualPathwayCNN3d`.
        segment: side of the labelled block in training (odd; a multiple of ``context_factor`` lets the
            context pathway train through the fast sub-lattice split).
    """

    dims = 3
    context_factor = 1  # the data layout: one raw region, no packed context channels

    def __init__(self, in_channels: int = 2, num_classes: int = 5,
                 widths: Sequence[int] = (30, 30, 40, 40, 40, 40, 50, 50), context_factor: int = 3,
                 fc_width: int = 150, dropout: float = 0.2, residual_at: Sequence[int] = (4, 6, 8),
                 segment: int = 9) -> None:
        super().__init__()
        if segment < 1 or segment % 2 == 0:
            raise ValueError(f"segment must be odd (centred on the sampled voxel), got {segment}")
        self.net = DualPathwayCNN3d(in_channels, num_classes, widths, context_factor, fc_width, dropout,
                                    residual_at=residual_at)
        self.in_channels, self.num_classes, self.segment = in_channels, num_classes, segment

    @property
    def margin(self) -> int:
        return self.net.margin

    @property
    def patch_size(self) -> int:
        return 2 * self.margin + 1

    def output_layers(self) -> list[nn.Module]:
        return self.net.output_layers()

    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, D, H, W]`` -> ``[B, K, D-2m, H-2m, W-2m]`` (m = margin)."""
        return self.net.dense_logits(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """A ``patch_size`` region -> ``[B, K]``; a segment region (wider by ``segment - 1``) -> its block."""
        if any(s < self.patch_size or (s - self.patch_size) % 2 for s in x.shape[2:]):
            raise ValueError(f"expected a region of side {self.patch_size} (+ an even width for a segment), got "
                             f"input {tuple(x.shape)}: use data.layout_of=${{model}}")
        return _squeeze_centre(self.dense_logits(x))


class TwoPathCascade(_CascadeOfTwo):
    """Havaei et al. 2017's cascades of two TwoPathCNNs: the first net's class probabilities, over the
    voxels the second net needs them at, join the second net at its input (InputCascadeCNN), after the
    first block of its local pathway (LocalCascadeCNN) or right before its output layer (MFCascadeCNN,
    a learnt mean-field-like step). Trained end to end (Havaei trained the first net first).

    The input is one 2-D (2.5-D) patch of side ``patch_size`` (65 / 57 / 53; Havaei's 65 / 56 / 53: an even
    side has no centre voxel, so the local cascade reads one unused voxel more); ``forward`` is
    ``dense_logits`` on it, so per-voxel and dense labelling agree by construction.

    Args:
        in_channels: modalities x slices.
        num_classes: label values K.
        join: "input", "local" or "output" (the mean-field cascade).
        first_local_width, first_global_width: the first net's pathway widths.
        local_width, global_width: the second net's pathway widths.
        dropout: dropout before each classifier.
    """

    dims = 2
    def __init__(self, in_channels: int = 2, num_classes: int = 5, join: str = "input",
                 first_local_width: int = 16, first_global_width: int = 32, local_width: int = 32,
                 global_width: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        if join not in TwoPathCNN.JOIN_POINTS:
            raise ValueError(f"join must be one of {sorted(TwoPathCNN.JOIN_POINTS)}, got {join!r}")
        self.in_channels, self.num_classes, self.join = in_channels, num_classes, join
        self.first = TwoPathCNN(in_channels, num_classes, first_local_width, first_global_width, dropout)
        at_input = join == "input"
        self.second = TwoPathCNN(in_channels + (num_classes if at_input else 0), num_classes, local_width,
                                 global_width, dropout, extra_channels=0 if at_input else num_classes,
                                 extra_at=join)
        self.shrink, self.offset = TwoPathCNN.JOIN_POINTS[join]

    @property
    def margin(self) -> int:
        """The larger of the first net's reach left and right of the second net's patch (see the class)."""
        m1, m2 = self.first.margin, self.second.margin
        return max(m1 + m2 - self.offset, self.offset + m1 + m2 - self.shrink)


    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, K, H-2m, W-2m]`` (m = margin)."""
        out = [n - 2 * self.margin for n in x.shape[2:]]
        start = self.margin - self.second.margin  # the second net's input, in x
        second_input = _window(x, start, [o + 2 * self.second.margin for o in out])
        joined = [o + 2 * self.second.margin - self.shrink for o in out]  # side of the joined maps
        first_input = _window(x, start + self.offset - self.first.margin,
                              [j + 2 * self.first.margin for j in joined])
        probabilities = torch.softmax(self.first.dense_logits(first_input), dim=1)
        if self.join == "input":
            return self.second.dense_logits(torch.cat([second_input, probabilities], dim=1))
        return self.second.dense_logits(second_input, probabilities)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, P, P]`` -> ``[B, K]``."""
        _check_patch(x, self.patch_size)
        return _squeeze_centre(self.dense_logits(x))


def _window(x: torch.Tensor, start: int, sides: Sequence[int]) -> torch.Tensor:
    """``x[..., start:start+side, ...]`` over the spatial axes."""
    return x[(..., *(slice(start, start + n) for n in sides))]


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

    def output_layers(self) -> list[nn.Module]:
        return [layer for member in self.members for layer in member.output_layers()]

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


_TINY_CASCADE = {"in_channels": 2, "num_classes": 5, "first_local_width": 2, "first_global_width": 2,
                 "local_width": 4, "global_width": 4}


@register_model("cascade_twopath_input", "volumetric", example_shape=(2, 65, 65), tiny_kwargs=_TINY_CASCADE)
def cascade_twopath_input(**kwargs: Any) -> TwoPathCascade:
    """Havaei's InputCascadeCNN: the first TwoPathCNN's probabilities join the second's input (65^2 patch)."""
    return TwoPathCascade(join="input", **kwargs)


@register_model("cascade_twopath_local", "volumetric", example_shape=(2, 57, 57), tiny_kwargs=_TINY_CASCADE)
def cascade_twopath_local(**kwargs: Any) -> TwoPathCascade:
    """Havaei's LocalCascadeCNN: the probabilities join the second net's local pathway after its first block."""
    return TwoPathCascade(join="local", **kwargs)


@register_model("cascade_twopath_meanfield", "volumetric", example_shape=(2, 53, 53), tiny_kwargs=_TINY_CASCADE)
def cascade_twopath_meanfield(**kwargs: Any) -> TwoPathCascade:
    """Havaei's MFCascadeCNN: the probabilities join right before the second net's output layer."""
    return TwoPathCascade(join="output", **kwargs)
