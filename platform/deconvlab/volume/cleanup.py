"""Refining a whole-volume label map: shape-aware clean-up (morphology, components, hole filling) and a
mean-field (CRF-style) refinement of the class probabilities.

Label regions (name -> the labels a region unites, e.g. BraTS whole/core/enhancing) are a parameter:
hole filling reads from them which label an enclosed hole takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage


def clean_up(label: np.ndarray, regions: Mapping[str, Sequence[int]], brain: np.ndarray | None = None,
             keep_fraction: float = 0.1, fill_holes: bool = True, smooth_radius: int = 1) -> np.ndarray:
    """Shape-aware clean-up of a label map (0 is background, any other label is foreground).

    1. No foreground outside the brain mask.
    2. Morphological smoothing of the foreground with a ``smooth_radius``-step 6-connected cross:
       a closing inside the brain first (fills notches and gaps narrower than the cross; each added
       voxel takes the label of the nearest foreground voxel), then an opening (drops spurs and bridges
       thinner than ``2 * smooth_radius + 1`` voxels). Closing first, so a dent cannot open into a hole.
    3. 3-D connected components of the foreground (26-connected): keep the largest and any at least
       ``keep_fraction`` of its size (multifocal tumours); drop the rest (isolated false positives).
    4. Fill enclosed holes region by region, as :func:`hole_fills` orders and labels them (BraTS:
       holes of the core become necrosis (1), remaining holes of the whole tumour become edema (2)).

    Args:
        label: ``[D, H, W]`` integer labels.
        regions: region name -> the labels it unites; step 4 reads them.
        brain: optional ``[D, H, W]`` brain mask.
        keep_fraction: smallest kept component, relative to the largest.
        fill_holes: run step 4.
        smooth_radius: closing/opening radius in voxels; 0 skips step 2.

    Returns:
        The cleaned ``[D, H, W]`` label map (a copy).
    """
    out = label.copy()
    inside = np.ones(out.shape, bool) if brain is None else brain.astype(bool)
    out[~inside] = 0
    if smooth_radius:
        ball = ndimage.iterate_structure(ndimage.generate_binary_structure(3, 1), smooth_radius)
        _close_with_nearest_label(out, ball, inside, smooth_radius)
        out[~ndimage.binary_opening(out > 0, ball)] = 0
    _keep_large_components(out, keep_fraction)
    if fill_holes:
        for members, filler in hole_fills(regions):
            region = np.isin(out, members)
            out[ndimage.binary_fill_holes(region) & ~region] = filler
    return out


def hole_fills(regions: Mapping[str, Sequence[int]]) -> list[tuple[tuple[int, ...], int]]:
    """Which regions have their enclosed holes filled, and with which label, smallest region first.

    A region's holes take its lowest label that no region nested inside it holds (BraTS: the core's
    holes become necrosis 1, the whole tumour's edema 2). A region nested in another with none nested
    in it (BraTS: the enhancing rim) keeps its holes: they are the enclosing region's other labels
    (the necrotic centre), and the enclosing region fills the true holes.

    Args:
        regions: region name -> the labels it unites.

    Returns:
        ``(labels of the region, label its holes take)`` pairs, in the order to apply them.
    """
    sets = sorted((frozenset(labels) for labels in regions.values()), key=len)
    fills = []
    for region in sets:
        nested = [other for other in sets if other < region]
        own = region.difference(*nested)
        if own and (nested or not any(region < other for other in sets)):
            fills.append((tuple(sorted(region)), min(own)))
    return fills


def _keep_large_components(label: np.ndarray, keep_fraction: float) -> None:
    """Zero, in place, the foreground components smaller than ``keep_fraction`` of the largest."""
    components, count = ndimage.label(label > 0, structure=np.ones((3, 3, 3), bool))
    if count > 1:
        sizes = np.bincount(components.ravel())[1:]
        keep = np.flatnonzero(sizes >= keep_fraction * sizes.max()) + 1
        label[~np.isin(components, keep)] = 0


def _close_with_nearest_label(label: np.ndarray, ball: np.ndarray, inside: np.ndarray, radius: int) -> None:
    """Closing of ``label > 0`` in place, inside ``inside``; only the foreground's bounding box (plus the
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
        logits = unary + weight * _neighbour_message(q, affinity)
        q = np.exp(logits - logits.max(0))
        q /= q.sum(0)
    out[(slice(None), *box)] = q
    return out


def _neighbour_message(q: np.ndarray, affinity: Sequence[np.ndarray]) -> np.ndarray:
    """Each voxel's affinity-weighted sum of its 6 neighbours' class probabilities ``q`` ``[K, D, H, W]``."""
    message = np.zeros_like(q)
    for axis, w in enumerate(affinity):
        lo, hi = [slice(None)] * 4, [slice(None)] * 4
        lo[axis + 1], hi[axis + 1] = slice(None, -1), slice(1, None)
        message[tuple(lo)] += w * q[tuple(hi)]
        message[tuple(hi)] += w * q[tuple(lo)]
    return message
