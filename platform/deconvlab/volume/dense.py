"""Whole-volume inference for the MRI patch nets: dense tiles and an ensemble.

Dense inference runs a net's ``dense_logits`` (see :mod:`deconvlab.models.mri`) on tiles of the volume
read with the net's margin on every side (zeros outside, the normalised background), so each voxel
gets exactly the prediction of the patch classifier centred on it while memory stays bounded by the
tile: only the class-probability volume ``[K, D, H, W]`` is as large as the scan. Several nets are
averaged in probability (an ensemble). :func:`per_voxel_probabilities` is the naive reference: one
patch per voxel.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn

from deconvlab.data.patches import extract_patch, geometry_of, net_slices, pad_image


def read_tile(image: np.ndarray, lo: Sequence[int], hi: Sequence[int]) -> np.ndarray:
    """``image[:, lo:hi]`` over the spatial axes, zero where the window leaves the volume."""
    out = np.zeros((image.shape[0], *(b - a for a, b in zip(lo, hi, strict=True))), np.float32)
    src = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, image.shape[1:], strict=True))
    dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, lo, strict=True))
    out[(slice(None), *dst)] = image[(slice(None), *src)]
    return out


def _tile_logits(model: nn.Module, image: np.ndarray, start: Sequence[int],
                 size: Sequence[int]) -> torch.Tensor:
    """Logits ``[K, *size]`` of the voxels ``start .. start+size`` (any may exceed the volume's end)."""
    m = model.margin
    device = next(model.parameters()).device
    if model.dims == 3:
        hi = [s + n + m for s, n in zip(start, size, strict=True)]
        tile = read_tile(image, [s - m for s in start], hi)
        return model.dense_logits(torch.from_numpy(tile)[None].to(device))[0]
    k = net_slices(model, image.shape[0]) // 2
    lo = [start[0] - m, start[1] - m, start[2] - k]
    hi = [start[0] + size[0] + m, start[1] + size[1] + m, start[2] + size[2] + k]
    tile = torch.from_numpy(read_tile(image, lo, hi)).to(device)  # [C, H', W', nz + 2k]
    # One batch item per axial slice; channels = modality x neighbouring slice, as the data module packs.
    windows = tile.unfold(3, 2 * k + 1, 1)  # [C, H', W', nz, slices]
    batch = windows.permute(3, 0, 4, 1, 2).reshape(size[2], -1, tile.shape[1], tile.shape[2])
    return model.dense_logits(batch).permute(1, 2, 3, 0)


@torch.no_grad()
def dense_probabilities(models: nn.Module | Sequence[nn.Module], image: np.ndarray, tile: int = 48,
                        mask: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities of every voxel, averaged over ``models`` (an ensemble).

    Args:
        models: one net or several with ``dense_logits`` and ``margin`` (their patch layouts may differ).
        image: ``[C, D, H, W]`` normalised volume.
        tile: output tile side; memory per tile grows with ``(tile + 2 * margin)^3``.
        mask: optional ``[D, H, W]`` brain mask: tiles without a brain voxel are not run and get
            probability 1 for class 0 (a clinical scan's field of view is mostly outside the brain).

    Returns:
        ``[K, D, H, W]`` float32 probabilities.
    """
    models = [models] if isinstance(models, nn.Module) else list(models)
    probabilities = np.zeros((models[0].num_classes, *image.shape[1:]), np.float32)
    for model in models:
        _add_model_share(probabilities, model, image, tile, mask, len(models))
    return probabilities


def _add_model_share(probabilities: np.ndarray, model: nn.Module, image: np.ndarray, tile: int,
                     mask: np.ndarray | None, members: int) -> None:
    """Add one net's probabilities, divided by the ensemble's ``members``, to ``probabilities`` in place."""
    model.eval()
    shape = image.shape[1:]
    # 2-D nets: a few axial slices per batch, twice the side in-plane (a 2-D tile is small, and its
    # 32-voxel margin costs less the larger the tile: ~20 % faster for TwoPathCNN than 48^2).
    size = [tile, tile, tile] if model.dims == 3 else [2 * tile, 2 * tile, 8]
    size = [min(t, n) for t, n in zip(size, shape, strict=True)]  # a small volume: one snug tile
    for start in itertools.product(*(range(0, n, t) for n, t in zip(shape, size, strict=True))):
        region = tuple(slice(s, min(s + t, n)) for s, t, n in zip(start, size, shape, strict=True))
        if mask is not None and not mask[region].any():
            probabilities[(0, *region)] += 1.0 / members
            continue
        logits = _tile_logits(model, image, start, size).float()  # bf16 under autocast
        crop = tuple(slice(0, r.stop - r.start) for r in region)
        share = torch.softmax(logits, 0)[(slice(None), *crop)].cpu().numpy() / members
        probabilities[(slice(None), *region)] += share


@torch.no_grad()
def per_voxel_probabilities(model: nn.Module, image: np.ndarray, centres: np.ndarray,
                            batch_size: int = 256) -> np.ndarray:
    """The naive reference for :func:`dense_probabilities`: one patch per voxel through ``forward``.

    Args:
        model: a patch net.
        image: ``[C, D, H, W]`` normalised volume.
        centres: ``[N, 3]`` voxels to classify.
        batch_size: patches per forward pass.

    Returns:
        ``[N, K]`` float32 probabilities.
    """
    model.eval()
    # One voxel per patch, whatever segment the net trains on.
    geometry = dataclasses.replace(geometry_of(model, image.shape[0]), label_size=1)
    padded = pad_image(image, geometry.margin)
    # The cheapest patch cut (context patches as slices of a pooled copy), as in training.
    pooled = geometry.pooled(padded)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(centres), batch_size):
        patches = np.stack([extract_patch(padded, c, geometry, pooled) for c in centres[i:i + batch_size]])
        logits = model(torch.from_numpy(patches).to(device)).float()
        out.append(torch.softmax(logits, 1).cpu().numpy())
    return np.concatenate(out)
