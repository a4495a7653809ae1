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

from deconvlab.data.patches import extract_patch, geometry_of, net_slices, pad_image
from deconvlab.tasks.volumetric import BRATS_REGIONS


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
    shape = image.shape[1:]
    num_classes = models[0].num_classes
    probabilities = np.zeros((num_classes, *shape), np.float32)
    for model in models:
        model.eval()
        # 2-D nets: a few axial slices per batch, twice the side in-plane (a 2-D tile is small, and its
        # 32-voxel margin costs less the larger the tile: ~20 % faster for TwoPathCNN than 48^2).
        size = [tile, tile, tile] if model.dims == 3 else [2 * tile, 2 * tile, 8]
        size = [min(t, n) for t, n in zip(size, shape, strict=True)]  # a small volume: one snug tile
        for start in itertools.product(*(range(0, n, t) for n, t in zip(shape, size, strict=True))):
            region = tuple(slice(s, min(s + t, n)) for s, t, n in zip(start, size, shape, strict=True))
            if mask is not None and not mask[region].any():
                probabilities[(0, *region)] += 1.0 / len(models)
                continue
            logits = _tile_logits(model, image, start, size).float()  # bf16 under autocast
            crop = tuple(slice(0, r.stop - r.start) for r in region)
            share = torch.softmax(logits, 0)[(slice(None), *crop)].cpu().numpy() / len(models)
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
    # The cheapest patch cut (context patches as slices of a pooled copy), as in training.
    pooled = geometry.pooled(padded)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(centres), batch_size):
        patches = np.stack([extract_patch(padded, c, geometry, pooled) for c in centres[i:i + batch_size]])
        logits = model(torch.from_numpy(patches).to(device)).float()
        out.append(torch.softmax(logits, 1).cpu().numpy())
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------ clean-up
def clean_up(label: np.ndarray, brain: np.ndarray | None = None, keep_fraction: float = 0.1,
             fill_holes: bool = True, smooth_radius: int = 1) -> np.ndarray:
    """Shape-aware clean-up of a BraTS label map.

    1. No tumour outside the brain mask.
    2. Morphological smoothing of the whole tumour with a ``smooth_radius``-step 6-connected cross:
       a closing inside the brain first (fills notches and gaps narrower than the cross; each added
       voxel takes the label of the nearest tumour voxel), then an opening (drops spurs and bridges
       thinner than ``2 * smooth_radius + 1`` voxels). Closing first, so a dent cannot open into a hole.
    3. 3-D connected components of the whole tumour (26-connected): keep the largest and any at least
       ``keep_fraction`` of its size (multifocal tumours); drop the rest (isolated false positives).
    4. Fill enclosed holes: holes of the core become necrosis (1), remaining holes of the whole
       tumour become edema (2).

    Nesting enhancing (4) in core {1,3,4} in whole {1,2,3,4} holds by construction in a label map;
    the steps above only relabel voxels between these sets, so it still holds afterwards.

    Args:
        label: ``[D, H, W]`` labels 0..4.
        brain: optional ``[D, H, W]`` brain mask.
        keep_fraction: smallest kept component, relative to the largest.
        fill_holes: run step 4.
        smooth_radius: closing/opening radius in voxels; 0 skips step 2.
    """
    out = label.copy()
    inside = np.ones(out.shape, bool) if brain is None else brain.astype(bool)
    out[~inside] = 0
    ball = ndimage.iterate_structure(ndimage.generate_binary_structure(3, 1), smooth_radius) if smooth_radius else None
    if ball is not None:
        _close_with_nearest_label(out, ball, inside, smooth_radius)
        out[~ndimage.binary_opening(out > 0, ball)] = 0
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


def _close_with_nearest_label(label: np.ndarray, ball: np.ndarray, inside: np.ndarray, radius: int) -> None:
    """Closing of ``label > 0`` in place, inside ``inside``; only the tumour's bounding box (plus the
    radius) is touched, so a whole scan costs what its tumour costs."""
    where = np.argwhere(label > 0)
    if not len(where):
        return
    pad = 2 * radius + 1
    box = tuple(slice(max(a - pad, 0), b + pad + 1) for a, b in zip(where.min(0), where.max(0), strict=True))
    part = label[box]
    # border_value=0 is outside the box, which is at least the closing's reach from the tumour.
    added = ndimage.binary_closing(part > 0, ball) & (part == 0) & inside[box]
    if added.any():
        _, nearest = ndimage.distance_transform_edt(part == 0, return_indices=True)
        part[added] = part[tuple(index[added] for index in nearest)]


def mean_field_refine(probabilities: np.ndarray, image: np.ndarray, weight: float = 1.0, sigma: float = 1.0,
                      iterations: int = 3, background_floor: float = 0.9) -> np.ndarray:
    """A CRF-style refinement: mean-field inference of a contrast-sensitive Potts model over the
    6-neighbourhood, with the net's probabilities as unaries (a local, cheap cousin of DeepMedic's
    fully connected CRF).

    Each iteration, a voxel's log-probability of class ``l`` gains ``weight`` times the sum over its
    neighbours of their probability of ``l``, each neighbour weighted by ``exp(-|I_v - I_u|^2 / 2 sigma^2)``
    over the modalities: labels spread between similar-looking neighbours, not across intensity edges.
    Only the box around voxels whose background probability is below ``background_floor`` is refined.

    Args:
        probabilities: ``[K, D, H, W]``.
        image: ``[C, D, H, W]`` normalised modalities.
        weight: strength of the pairwise term (0 returns the probabilities unchanged).
        sigma: intensity scale of the contrast sensitivity (in normalised units).
        iterations: mean-field updates.
        background_floor: voxels at least this sure of background, away from the rest, are left alone.

    Returns:
        Refined ``[K, D, H, W]`` probabilities.
    """
    out = probabilities.copy()
    where = np.argwhere(probabilities[0] < background_floor)
    if weight == 0 or not len(where):
        return out
    pad = iterations + 1  # how far labels can travel in that many updates
    box = tuple(slice(max(a - pad, 0), b + pad + 1) for a, b in zip(where.min(0), where.max(0), strict=True))
    unary = np.log(np.clip(probabilities[(slice(None), *box)], 1e-6, 1.0))
    part = image[(slice(None), *box)]
    # Affinity of each voxel with its next neighbour along each axis.
    affinity = [np.exp(-(np.diff(part, axis=a + 1) ** 2).sum(0) / (2 * sigma ** 2)) for a in range(3)]
    q = probabilities[(slice(None), *box)]
    for _ in range(iterations):
        message = np.zeros_like(q)
        for axis, w in enumerate(affinity):
            lo, hi = [slice(None)] * 4, [slice(None)] * 4
            lo[axis + 1], hi[axis + 1] = slice(None, -1), slice(1, None)
            message[tuple(lo)] += w * q[tuple(hi)]
            message[tuple(hi)] += w * q[tuple(lo)]
        logits = unary + weight * message
        q = np.exp(logits - logits.max(0))
        q /= q.sum(0)
    out[(slice(None), *box)] = q
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
