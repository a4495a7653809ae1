"""Whole-volume evaluation of the MRI patch nets: a per-case table (Dice, sensitivity and HD95 per label
region, with and without the shape-aware clean-up) and axial slices with contour overlays.

Used at the end of training / evaluation by :class:`deconvlab.tasks.volumetric.VolumetricSegmentationTask`
(logged to MLflow) and by ``benchmarks/volume_inference.py``.
"""

from __future__ import annotations

import csv
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn
from scipy import ndimage

from deconvlab.volume.cleanup import clean_up, mean_field_refine
from deconvlab.volume.dense import dense_probabilities
from deconvlab.volume.metrics import hausdorff95, region_metrics

STAGES = ("raw", "cleaned", "crf")
TRUTH_COLOUR, PREDICTION_COLOUR = (0, 220, 0), (255, 40, 40)


def case_rows(name: str, probabilities: np.ndarray, truth: np.ndarray, brain: np.ndarray | None,
              regions: Mapping[str, Sequence[int]], clean: Mapping[str, Any] | None = None,
              crf: Mapping[str, Any] | None = None, image: np.ndarray | None = None,
              ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The table rows of one case (one per stage) and its label map per stage.

    Stages: ``raw`` (argmax), ``cleaned`` (shape-aware clean-up), ``crf`` (mean-field refinement of the
    probabilities, then the clean-up if one is configured).

    Args:
        name: the case's name.
        probabilities: ``[K, D, H, W]`` class probabilities.
        truth: ``[D, H, W]`` labels.
        brain: the brain mask (clean-up keeps tumour inside it).
        regions: region name -> the labels it unites; each gets ``dice_``, ``sensitivity_`` and ``hd95_``
            columns, and the clean-up fills holes by them.
        clean: keyword arguments of :func:`deconvlab.volume.cleanup.clean_up`; None skips the cleaned stage.
        crf: keyword arguments of :func:`deconvlab.volume.cleanup.mean_field_refine`; None skips the crf
            stage.
        image: ``[C, D, H, W]`` modalities (the CRF's contrast term); needed with ``crf``.

    Returns:
        The rows (``case``, ``stage``, then the metrics) and the label map of each stage.
    """
    labels = {"raw": probabilities.argmax(0).astype(np.uint8)}
    if clean is not None:
        labels["cleaned"] = clean_up(labels["raw"], regions, brain, **clean)
    if crf is not None:
        refined = mean_field_refine(probabilities, image, **crf).argmax(0).astype(np.uint8)
        labels["crf"] = clean_up(refined, regions, brain, **clean) if clean is not None else refined
    rows = [{"case": name, "stage": stage, **stage_metrics(prediction, truth, regions)}
            for stage, prediction in labels.items()]
    return rows, labels


def stage_metrics(prediction: np.ndarray, truth: np.ndarray,
                  regions: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Dice and sensitivity (:func:`~deconvlab.volume.metrics.region_metrics`), then HD95, of each region.

    Args:
        prediction: ``[D, H, W]`` labels.
        truth: ``[D, H, W]`` labels.
        regions: region name -> the labels it unites.

    Returns:
        ``dice_<region>``, ``sensitivity_<region>``, ..., ``hd95_<region>``, ... in that order (the
        table's columns).
    """
    out = region_metrics(prediction, truth, regions)
    for region, members in regions.items():
        out[f"hd95_{region}"] = hausdorff95(np.isin(prediction, members), np.isin(truth, members))
    return out


def evaluate_cases(nets: nn.Module | Sequence[nn.Module], cases: Sequence[Any],
                   regions: Mapping[str, Sequence[int]], tile: int = 48, clean: Mapping[str, Any] | None = None,
                   crf: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Dense inference on every case (an ensemble if several nets), then :func:`case_rows`.

    Args:
        nets: one patch net or several (averaged in probability).
        cases: volumes with ``name``, ``image``, ``label`` and ``brain`` (:class:`deconvlab.data.brats.Case`).
        regions: region name -> the labels it unites (the table's metric columns).
        tile: dense inference tile side.
        clean: see :func:`case_rows`.
        crf: see :func:`case_rows`.

    Returns:
        The rows of all cases (with ``seconds`` of inference) and one contour-overlay image per case.
    """
    rows, overlays = [], {}
    for case in cases:
        start = time.perf_counter()
        probabilities = dense_probabilities(nets, case.image, tile=tile, mask=case.brain)
        seconds = time.perf_counter() - start
        case_table, labels = case_rows(case.name, probabilities, case.label, case.brain, regions, clean, crf,
                                       case.image)
        rows += [{**row, "seconds": round(seconds, 2)} for row in case_table]
        shown = labels.get("cleaned", labels["raw"])
        overlays[f"{case.name}_contours_truth_green_prediction_red"] = contour_overlay(case.image[0], case.label,
                                                                                       shown)
    return rows, overlays


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of each metric over cases, per stage: ``volume_dice_<region>``, ``volume_dice_<region>_cleaned``, ...

    HD95 is averaged over the cases where it is finite (it is infinite when one of the two masks is
    empty) and left out when it is finite nowhere: trackers and Ray reject infinite metrics.
    """
    out = {}
    for stage in STAGES:
        chosen = [r for r in rows if r["stage"] == stage]
        suffix = "" if stage == "raw" else f"_{stage}"
        for key in (k for k in (chosen[0] if chosen else {}) if k.startswith(("dice_", "sensitivity_", "hd95_"))):
            values = [r[key] for r in chosen if np.isfinite(r[key])]
            if values:
                out[f"volume_{key}{suffix}"] = float(np.mean(values))
    return out


def write_table(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write the rows as CSV (floats rounded to 4 decimals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    return path


def log_table(client: Any, run_id: str, rows: Sequence[Mapping[str, Any]], name: str,
              folder: str = "volume") -> None:
    """Log the rows as the CSV artifact ``folder/name`` of an MLflow run (written to a temporary file)."""
    with tempfile.TemporaryDirectory() as scratch:
        client.log_artifact(run_id, str(write_table(rows, Path(scratch) / name)), folder)


def contour_overlay(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """The axial slice (last axis) with most true foreground: the modality in grey, the foreground's
    (every non-zero label's) outline in green (truth) and red (prediction; yellow where they coincide).
    ``H x W x 3`` uint8."""
    z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if truth.any() else truth.shape[2] // 2
    plane = image[:, :, z]
    low, high = np.percentile(plane, [1, 99])
    grey = (np.clip((plane - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for mask, colour in ((truth[:, :, z] > 0, TRUTH_COLOUR), (prediction[:, :, z] > 0, PREDICTION_COLOUR)):
        outline = mask & ~ndimage.binary_erosion(mask)
        rgb[outline] = np.maximum(rgb[outline], colour) if colour == PREDICTION_COLOUR else colour
    return rgb
