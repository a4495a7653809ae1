"""Patches cut around a centre voxel of a normalised volume, in the layouts the MRI patch nets take
(see :mod:`deconvlab.data.brats` for the layouts), and the layout a given net expects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deconvlab.errors import UserError


@dataclass(frozen=True)
class PatchGeometry:
    """How a patch is cut around a centre voxel (the layouts: :mod:`deconvlab.data.brats`).

    ``label_size > 1`` (a training *segment*, DeepMedic's way of labelling many voxels per forward pass)
    labels the ``label_size^3`` block around the centre: the raw region cut is then
    ``patch_size + label_size - 1`` voxels wide (only for the raw-region layout, 3-D without packed context).
    """

    patch_dims: int = 3
    patch_size: int = 9
    context_factor: int = 3
    slices: int = 1
    label_size: int = 1

    def __post_init__(self) -> None:
        if self.patch_dims not in (2, 3):
            raise UserError(f"patch_dims must be 2 or 3, got {self.patch_dims}", "data.patch_dims")
        for key, value in (("patch_size", self.patch_size), ("context_factor", self.context_factor),
                           ("slices", self.slices), ("label_size", self.label_size)):
            if value < 1 or value % 2 == 0:
                raise UserError(f"{key} must be odd and >= 1 (a patch is centred on a voxel), got {value}",
                                f"data.{key}")
        if self.label_size > 1 and (self.patch_dims != 3 or self.context_factor != 1):
            raise UserError("segments (label_size > 1) are cut as one raw 3-D region",
                            "data.label_size", "use a net that reads a raw region (data.layout_of=${model})")

    @property
    def side(self) -> int:
        """Side of the region cut: the patch, widened by the segment it labels."""
        return self.patch_size + self.label_size - 1

    @property
    def margin(self) -> int:
        """Voxels needed on each side of a centre (the padding that keeps every centre valid)."""
        if self.patch_dims == 2:
            return max(self.patch_size // 2, self.slices // 2)
        return (self.context_factor * self.side) // 2

    @property
    def has_context(self) -> bool:
        """Whether the patch packs a context pathway's channels."""
        return self.patch_dims == 3 and self.context_factor > 1

    def pooled(self, padded: np.ndarray) -> np.ndarray | None:
        """:func:`context_pool` of a padded image when the layout has a context pathway, else None:
        computed once per image, it makes every context patch a strided slice."""
        return context_pool(padded, self.context_factor) if self.has_context else None

    def channels(self, modalities: int) -> int:
        if self.patch_dims == 2:
            return modalities * self.slices
        return modalities * (2 if self.has_context else 1)


def net_slices(net: Any, modalities: int) -> int:
    """Axial slices a 2-D net's input packs per modality (2.5-D: its channels / modalities)."""
    if net.in_channels % modalities:
        raise UserError(f"a 2-D net with {net.in_channels} input channels cannot take {modalities} modalities",
                        "model.in_channels", "set it to modalities x data.slices")
    return net.in_channels // modalities


def geometry_of(net: Any, modalities: int) -> PatchGeometry:
    """The patch layout a patch net trains on (its ``dims``, ``patch_size``, ``context_factor`` and, for a
    net trained on segments, ``segment``: the side of the block one training input labels)."""
    if net.dims == 2:
        return PatchGeometry(2, net.patch_size, 1, net_slices(net, modalities))
    return PatchGeometry(3, net.patch_size, net.context_factor, label_size=getattr(net, "segment", 1))


def layout_of(net_or_config: Any, modalities: int) -> PatchGeometry:
    """:func:`geometry_of` a net, or of a Hydra model config (a mapping with ``_target_``) without
    building a real network: the config is instantiated on the meta device (no memory, no weights)
    with the RNG state forked, so asking for the layout neither costs a network nor shifts the seed
    the trained net is initialised from."""
    if not isinstance(net_or_config, Mapping):
        return geometry_of(net_or_config, modalities)
    from hydra.utils import instantiate

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        net = instantiate(net_or_config)
    return geometry_of(net, modalities)


def pad_image(image: np.ndarray, margin: int) -> np.ndarray:
    """Zero-pad the spatial axes (0 is the normalised value outside the brain)."""
    return np.pad(image, [(0, 0)] + [(margin, margin)] * (image.ndim - 1))


def context_pool(padded: np.ndarray, factor: int) -> np.ndarray:
    """The mean of every ``factor^3`` block at every offset (stride-1 average pooling) of a padded image.

    Computed once per case, it turns a context patch into a strided slice (see :func:`extract_patch`)
    instead of a ``(f*S)^3`` average per patch.
    """
    import torch.nn.functional as F

    pooled = F.avg_pool3d(torch.from_numpy(np.ascontiguousarray(padded, np.float32))[None], factor, stride=1)
    return pooled[0].numpy()


def extract_patch(padded: np.ndarray, centre: Sequence[int], geometry: PatchGeometry,
                  pooled: np.ndarray | None = None) -> np.ndarray:
    """The model input around ``centre`` (unpadded voxel coordinates) from an image padded by
    ``geometry.margin``; ``pooled`` = :func:`context_pool` of it makes the context patch a slice."""
    c = np.asarray(centre) + geometry.margin
    h = geometry.side // 2
    if geometry.patch_dims == 2:
        k = geometry.slices // 2
        block = padded[:, c[0] - h:c[0] + h + 1, c[1] - h:c[1] + h + 1, c[2] - k:c[2] + k + 1]
        return np.ascontiguousarray(block.transpose(0, 3, 1, 2).reshape(-1, block.shape[1], block.shape[2]))
    local = padded[:, c[0] - h:c[0] + h + 1, c[1] - h:c[1] + h + 1, c[2] - h:c[2] + h + 1]
    if geometry.context_factor == 1:
        return np.ascontiguousarray(local)
    f, s, big = geometry.context_factor, geometry.patch_size, geometry.margin
    lo = c - big  # the context region's first voxel; its blocks start every f voxels from there
    if pooled is not None:
        context = pooled[:, lo[0]:lo[0] + s * f:f, lo[1]:lo[1] + s * f:f, lo[2]:lo[2] + s * f:f]
    else:
        region = padded[:, lo[0]:c[0] + big + 1, lo[1]:c[1] + big + 1, lo[2]:c[2] + big + 1]
        context = region.reshape(-1, s, f, s, f, s, f).mean(axis=(2, 4, 6))
    return np.concatenate([local, context.astype(np.float32, copy=False)])


def channel_modalities(geometry: PatchGeometry, modalities: int) -> np.ndarray:
    """The modality index of each input channel of ``geometry``'s layout: 2-D packs ``slices`` channels
    per modality (modality-major), 3-D with context repeats the modalities (patch, then context)."""
    channels = np.arange(geometry.channels(modalities))
    return channels // geometry.slices if geometry.patch_dims == 2 else channels % modalities


@dataclass(frozen=True)
class PatchAugmentation:
    """Training augmentation of a patch and its label, after DeepMedic's (Kamnitsas et al. 2017): a random
    reflection of volume axis 0 (left-right: the shared BraTS cases are stored L, P, S) and, per modality, a
    random scale ``1 + N(0, scale_std)`` and shift ``N(0, shift_std)`` of the z-scored intensities.

    Every layout here is symmetric about its centre voxel (the context blocks too), so reflecting the
    patch is the patch of the reflected volume. The draws come from ``default_rng([seed, epoch, index])``:
    the same seed sees the same augmented epochs, whichever loader worker cuts a patch.

    Args:
        modality_of_channel: :func:`channel_modalities` of the layout.
        seed: the data seed.
        flip: reflect with probability 1/2.
        scale_std, shift_std: intensity jitter per modality (0 = none).
    """

    modality_of_channel: tuple[int, ...]
    seed: int = 0
    flip: bool = True
    scale_std: float = 0.0
    shift_std: float = 0.0

    def __post_init__(self) -> None:
        if self.scale_std < 0 or self.shift_std < 0:
            raise UserError(f"augmentation scale_std/shift_std must be >= 0, got {self.scale_std}/{self.shift_std}",
                            "data.augment")

    def __call__(self, patch: np.ndarray, label: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The augmented ``(patch, label)``; ``label`` is a centre class (0-d) or a segment block."""
        rng = np.random.default_rng([self.seed, epoch, index])
        if self.scale_std or self.shift_std:  # one draw per modality, spread to its channels
            modalities = max(self.modality_of_channel) + 1
            per_channel = np.asarray(self.modality_of_channel)
            scale = 1.0 + rng.normal(0.0, self.scale_std, modalities)
            shift = rng.normal(0.0, self.shift_std, modalities)
            broadcast = (-1,) + (1,) * (patch.ndim - 1)
            patch = patch * scale[per_channel].reshape(broadcast) + shift[per_channel].reshape(broadcast)
        if self.flip and rng.random() < 0.5:
            patch = patch[:, ::-1]  # patch axis 1 is volume axis 0 in both layouts
            # np.array, not ascontiguousarray: that one turns a centre class (0-d) into shape [1].
            label = np.array(label[::-1]) if label.ndim == 3 else label
        return np.ascontiguousarray(patch, np.float32), label
