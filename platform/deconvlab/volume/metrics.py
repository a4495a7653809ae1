"""Scores of a whole-volume label map against the truth, per label region: Dice, sensitivity, HD95.

Conventions (docs/metrics.md): every score here is of ONE case; a data set's figure is the mean over its
cases ("per-case mean", :func:`deconvlab.volume.report.summarise`). HD95 is MedPy's ``hd95`` in mm: the
95th percentile of the pooled symmetric surface distances, measured with the case's voxel spacing. A
region present in one map and absent from the other (a missed or a spurious region) has no surface to
measure against; it scores the **penalty**, the diagonal of the case's bounding box in mm (the largest
distance two voxels of the case can have), so a net that misses a region scores worst, never better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage


def region_metrics(prediction: np.ndarray, truth: np.ndarray,
                   regions: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Dice and sensitivity per region (``dice_<region>``, ``sensitivity_<region>``).

    Dice of a region absent from both maps is 1 (a perfect match, not 0/0); so is the sensitivity of a
    region absent from the truth.

    Args:
        prediction: ``[D, H, W]`` labels.
        truth: ``[D, H, W]`` labels.
        regions: region name -> the labels it unites.

    Returns:
        Two metrics per region.
    """
    out = {}
    for name, labels in regions.items():
        p, t = np.isin(prediction, labels), np.isin(truth, labels)
        overlap, total = float((p & t).sum()), float(p.sum() + t.sum())
        out[f"dice_{name}"] = 2 * overlap / total if total else 1.0
        out[f"sensitivity_{name}"] = overlap / float(t.sum()) if t.any() else 1.0
    return out


def diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The diagonal of a volume of ``shape`` voxels of size ``spacing`` (mm): HD95's penalty."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


def hausdorff95(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                penalty: float | None = None) -> float:
    """MedPy's ``hd95``: the 95th percentile of the pooled symmetric surface distances (mm).

    The surface of a mask is its voxels that a one-voxel erosion (6-connected) removes; the distances
    from every predicted surface voxel to the true surface and from every true surface voxel to the
    predicted one are pooled, and their 95th percentile (linear interpolation) is the result. This is
    not the larger of the two directed 95th percentiles (which is never smaller).

    Args:
        prediction: ``[D, H, W]`` bool mask.
        truth: ``[D, H, W]`` bool mask.
        spacing: voxel size per axis (mm), e.g. :attr:`deconvlab.data.brats.Case.spacing`.
        penalty: the score when exactly one mask is empty (a missed or spurious region); None: the
            volume's diagonal in mm (:func:`diagonal_mm`).

    Returns:
        The distance in mm; 0 if both masks are empty; ``penalty`` if only one is.
    """
    if not prediction.any() or not truth.any():
        if prediction.any() == truth.any():
            return 0.0
        return diagonal_mm(truth.shape, spacing) if penalty is None else float(penalty)
    sp, st = _surface(prediction), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_prediction = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(np.percentile(np.concatenate([to_truth, to_prediction]), 95))


def hd95_penalised(prediction: np.ndarray, truth: np.ndarray) -> bool:
    """Whether :func:`hausdorff95` of these masks is the penalty (exactly one of them is empty)."""
    return bool(prediction.any()) != bool(truth.any())


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)
