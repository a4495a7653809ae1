"""A planning step (after nnU-Net's experiment planning): read the training cases, derive the sampling
and check the patch geometry against them, and write it all down next to the run's outputs.

The plan records what the numbers were derived from (shapes, spacing, label frequencies, tumour
extent, intensity range) so a run's sampling can be explained without re-reading the data.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PLAN_FILE = "patch_plan.json"


def _tumour_extent(label: np.ndarray) -> int:
    """Largest side of the tumour's bounding box, in voxels (0 without tumour)."""
    where = np.argwhere(label > 0)
    return int((where.max(0) - where.min(0) + 1).max()) if len(where) else 0


def planned_label_fractions(present: Sequence[bool], tumour_fraction: float) -> list[float]:
    """Background gets ``tumour_fraction``'s complement; the tumour share is split equally over the
    tumour labels present in the data (Havaei's class balancing: rare enhancing voxels are seen as
    often as edema)."""
    tumour = [k for k in range(1, len(present)) if present[k]]
    fractions = [0.0] * len(present)
    fractions[0] = 1.0 - tumour_fraction if tumour else 1.0
    for k in tumour:
        fractions[k] = tumour_fraction / len(tumour)
    return fractions


def smallest_context_factor(patch_size: int, extent: float, largest: int = 9) -> int:
    """The smallest odd factor f with ``f * patch_size >= extent`` (the context sees a whole tumour)."""
    factor = 1
    while factor * patch_size < extent and factor < largest:
        factor += 2
    return factor


def plan_cases(cases: Sequence[Any], patch_dims: int, patch_size: int, context_factor: int,
               tumour_fraction: float, num_classes: int) -> dict[str, Any]:
    """Derive the sampling and check the geometry from the training cases.

    Args:
        cases: :class:`deconvlab.data.brats.Case` objects (images already normalised).
        patch_dims, patch_size, context_factor: the configured patch geometry.
        tumour_fraction: the share of patches centred on tumour voxels.
        num_classes: label values.

    Returns:
        A JSON-able dict; ``label_fractions`` is what the sampler uses.
    """
    counts = np.zeros(num_classes, np.int64)
    for case in cases:
        labelled = case.label[case.brain | (case.label > 0)].ravel()
        counts += np.bincount(labelled, minlength=num_classes)[:num_classes]
    extents = [_tumour_extent(case.label) for case in cases]
    spacing = [np.sqrt((case.affine[:3, :3] ** 2).sum(0)).round(3).tolist() for case in cases]
    inside = np.concatenate([case.image[:, case.brain].T for case in cases])
    median_extent = float(np.median(extents))
    field_of_view = patch_size * (context_factor if patch_dims == 3 else 1)
    recommended = smallest_context_factor(patch_size, median_extent)
    if patch_dims == 3 and context_factor < recommended:
        warnings.warn(f"context patch ({field_of_view} voxels) is smaller than the median tumour extent "
                      f"({median_extent:.0f}); data.context_factor={recommended} would cover it",
                      stacklevel=2)
    return {
        "cases": [case.name for case in cases],
        "shapes": [list(case.label.shape) for case in cases],
        "median_shape": np.median([case.label.shape for case in cases], axis=0).astype(int).tolist(),
        "spacing_mm": spacing,
        "label_voxel_fraction": (counts / max(counts.sum(), 1)).round(6).tolist(),
        "tumour_extent_voxels": extents,
        "intensity_percentiles_0.5_99.5": np.percentile(inside, [0.5, 99.5], axis=0).round(3).T.tolist(),
        "patch_dims": patch_dims,
        "patch_size": patch_size,
        "context_factor": context_factor,
        "context_factor_recommended": recommended,
        "field_of_view_voxels": field_of_view,
        "tumour_fraction": tumour_fraction,
        "label_fractions": planned_label_fractions(counts > 0, tumour_fraction),
    }


def write_plan(plan: dict[str, Any], folder: str | Path) -> Path:
    """Write ``plan`` as ``<folder>/patch_plan.json`` and return the path."""
    path = Path(folder) / PLAN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=2))
    return path
