"""Whole-volume inference for the MRI patch nets: dense tiles, an ensemble, shape-aware clean-up, metrics.

Dense inference runs a net's ``dense_logits`` (see :mod:`deconvlab.models.mri`) on tiles of the volume
read with the net's margin on every side (zeros outside, the normalised background), so each voxel
gets exactly the prediction of the patch classifier centred on it while memory stays bounded by the
tile: only the class-probability volume ``[K, D, H, W]`` is as large as the scan. Several nets are
averaged in probability (an ensemble). :func:`per_voxel_probabilities` is the naive reference: one
patch per voxel.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy import ndimage

from deconvlab.data.brats import PatchGeometry, extract_patch, pad_image
from deconvlab.tasks.volumetric import BRATS_REGIONS


def geometry_of(model: nn.Module, modalities: int) -> PatchGeometry:
    """The patch layout a model's ``forward`` expects (as cut by :mod:`deconvlab.data.brats`)."""
    if model.dims == 2:
        return PatchGeometry(2, model.patch_size, 1, _slices(model, modalities))
    return PatchGeometry(3, model.patch_size, model.context_factor)


def _slices(model: nn.Module, modalities: int) -> int:
    channels = model.local[0].in_channels
    if channels % modalities:
        raise ValueError(f"a 2-D net with {channels} input channels cannot take {modalities} modalities")
    return channels // modalities


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
    if model.dims == 3:
        hi = [s + n + m for s, n in zip(start, size, strict=True)]
        tile = read_tile(image, [s - m for s in start], hi)
        return model.dense_logits(torch.from_numpy(tile)[None])[0]
    k = _slices(model, image.shape[0]) // 2
    lo = [start[0] - m, start[1] - m, start[2] - k]
    hi = [start[0] + size[0] + m, start[1] + size[1] + m, start[2] + size[2] + k]
    tile = torch.from_numpy(read_tile(image, lo, hi))  # [C, H', W', nz + 2k]
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
    shape = image.shape[1:]
    num_classes = models[0].num_classes
    probabilities = np.zeros((num_classes, *shape), np.float32)
    for model in models:
        model.eval()
        # 2-D nets: a few axial slices per batch.
        size = [tile, tile, tile] if model.dims == 3 else [tile, tile, 8]
        for start in itertools.product(*(range(0, n, t) for n, t in zip(shape, size, strict=True))):
            region = tuple(slice(s, min(s + t, n)) for s, t, n in zip(start, size, shape, strict=True))
            if mask is not None and not mask[region].any():
                probabilities[(0, *region)] += 1.0 / len(models)
                continue
            logits = _tile_logits(model, image, start, size)
            crop = tuple(slice(0, r.stop - r.start) for r in region)
            share = torch.softmax(logits, 0)[(slice(None), *crop)].numpy() / len(models)
            probabilities[(slice(None), *region)] += share
    return probabilities


@torch.no_grad()
def per_voxel_probabilities(model: nn.Module, image: np.ndarray, centres: np.ndarray,
                            batch_size: int = 256) -> np.ndarray:
    """The naive reference: one patch per voxel through ``forward``. Returns ``[N, K]`` probabilities
    for ``centres`` ``[N, 3]``."""
    model.eval()
    geometry = geometry_of(model, image.shape[0])
    padded = pad_image(image, geometry.margin)
    out = []
    for i in range(0, len(centres), batch_size):
        patches = np.stack([extract_patch(padded, c, geometry) for c in centres[i:i + batch_size]])
        out.append(torch.softmax(model(torch.from_numpy(patches)), 1).numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ clean-up
def clean_up(label: np.ndarray, brain: np.ndarray | None = None, keep_fraction: float = 0.1,
             fill_holes: bool = True) -> np.ndarray:
    """Shape-aware clean-up of a BraTS label map.

    1. No tumour outside the brain mask.
    2. 3-D connected components of the whole tumour (26-connected): keep the largest and any at least
       ``keep_fraction`` of its size (multifocal tumours); drop the rest (isolated false positives).
    3. Fill enclosed holes: holes of the core become necrosis (1), remaining holes of the whole
       tumour become edema (2).

    Nesting enhancing (4) in core {1,3,4} in whole {1,2,3,4} holds by construction in a label map;
    the steps above only relabel voxels between these sets, so it still holds afterwards.
    """
    out = label.copy()
    if brain is not None:
        out[~brain] = 0
    components, count = ndimage.label(out > 0, structure=np.ones((3, 3, 3), bool))
    if count > 1:
        sizes = np.bincount(components.ravel())[1:]
        keep = np.flatnonzero(sizes >= keep_fraction * sizes.max()) + 1
        out[~np.isin(components, keep)] = 0
    if fill_holes:
        core = np.isin(out, BRATS_REGIONS["core"])
        out[ndimage.binary_fill_holes(core) & ~core] = 1
        whole = out > 0
        out[ndimage.binary_fill_holes(whole) & ~whole] = 2
    return out


# ------------------------------------------------------------------------------------------- metrics
def region_metrics(prediction: np.ndarray, truth: np.ndarray,
                   regions: Mapping[str, Sequence[int]] = BRATS_REGIONS) -> dict[str, float]:
    """Dice and sensitivity per region (``dice_whole``, ``sensitivity_core``, ...).

    Dice of a region absent from both maps is 1 (a perfect match, not 0/0).
    """
    out = {}
    for name, labels in regions.items():
        p, t = np.isin(prediction, labels), np.isin(truth, labels)
        overlap, total = float((p & t).sum()), float(p.sum() + t.sum())
        out[f"dice_{name}"] = 2 * overlap / total if total else 1.0
        out[f"sensitivity_{name}"] = overlap / float(t.sum()) if t.any() else 1.0
    return out


def hausdorff95(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1, 1, 1)) -> float:
    """95th percentile of the symmetric surface distance (mm) between two masks; inf if one is empty."""
    if not prediction.any() or not truth.any():
        return float("inf") if prediction.any() != truth.any() else 0.0

    def surface(mask: np.ndarray) -> np.ndarray:
        return mask & ~ndimage.binary_erosion(mask)

    sp, st = surface(prediction), surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_prediction = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(np.percentile(np.concatenate([to_truth, to_prediction]), 95))


def save_segmentation(label: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a label map as NIfTI (uint8) with the input scan's affine, so it overlays the scan."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(label.astype(np.uint8), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path
