"""Scores of a whole-volume label map against the truth, per label region: Dice, sensitivity, HD95."""

from __future__ import annotations

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


def hausdorff95(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float] = (1, 1, 1)) -> float:
    """95th percentile of the symmetric surface distance (mm) between two masks.

    Args:
        prediction: ``[D, H, W]`` bool mask.
        truth: ``[D, H, W]`` bool mask.
        spacing: voxel size per axis (mm).

    Returns:
        The distance; 0 if both masks are empty, inf if only one is.
    """
    if not prediction.any() or not truth.any():
        return float("inf") if prediction.any() != truth.any() else 0.0
    sp, st = _surface(prediction), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
    to_prediction = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
    return float(np.percentile(np.concatenate([to_truth, to_prediction]), 95))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)
