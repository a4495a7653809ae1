"""Whole-volume evaluation of the MRI patch nets: a per-case table (Dice, sensitivity and HD95 per label
region, with and without the shape-aware clean-up) and axial slices with contour overlays.

The logged figures are per-case means of the table's columns (:func:`summarise`, docs/metrics.md); HD95
is in mm from each case's voxel spacing, and a missed or spurious region scores the case's diagonal (see
:mod:`deconvlab.volume.metrics`), counted in ``hd95_missed_<region>``.

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
from deconvlab.volume.metrics import hausdorff95, hd95_penalised, region_metrics

STAGES = ("raw", "cleaned", "crf")
TRUTH_COLOUR, PREDICTION_COLOUR = (0, 220, 0), (255, 40, 40)


def case_rows(name: str, probabilities: np.ndarray, truth: np.ndarray, brain: np.ndarray | None,
              regions: Mapping[str, Sequence[int]], clean: Mapping[str, Any] | None = None,
              crf: Mapping[str, Any] | None = None, image: np.ndarray | None = None, *,
              spacing: Sequence[float]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
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
        spacing: the case's voxel size per axis (mm), for HD95.

    Returns:
        The rows (``case``, ``stage``, then the metrics) and the label map of each stage.
    """
    labels = {"raw": probabilities.argmax(0).astype(np.uint8)}
    if clean is not None:
        labels["cleaned"] = clean_up(labels["raw"], regions, brain, **clean)
    if crf is not None:
        refined = mean_field_refine(probabilities, image, **crf).argmax(0).astype(np.uint8)
        labels["crf"] = clean_up(refined, regions, brain, **clean) if clean is not None else refined
    rows = [{"case": name, "stage": stage, **stage_metrics(prediction, truth, regions, spacing)}
            for stage, prediction in labels.items()]
    return rows, labels


def stage_metrics(prediction: np.ndarray, truth: np.ndarray, regions: Mapping[str, Sequence[int]],
                  spacing: Sequence[float]) -> dict[str, float]:
    """Dice and sensitivity (:func:`~deconvlab.volume.metrics.region_metrics`), then HD95, of each region.

    Args:
        prediction: ``[D, H, W]`` labels.
        truth: ``[D, H, W]`` labels.
        regions: region name -> the labels it unites.
        spacing: voxel size per axis (mm).

    Returns:
        ``dice_<region>``, ``sensitivity_<region>``, ..., ``hd95_<region>`` (mm), ..., then
        ``hd95_missed_<region>``, ...: 1.0 where the HD95 is the penalty (a missed or spurious region),
        else 0.0; in that order (the table's columns).
    """
    out = region_metrics(prediction, truth, regions)
    masks = {region: (np.isin(prediction, members), np.isin(truth, members)) for region, members in regions.items()}
    for region, (p, t) in masks.items():
        out[f"hd95_{region}"] = hausdorff95(p, t, spacing)
    for region, (p, t) in masks.items():
        out[f"hd95_missed_{region}"] = float(hd95_penalised(p, t))
    return out


def evaluate_cases(nets: nn.Module | Sequence[nn.Module], cases: Sequence[Any],
                   regions: Mapping[str, Sequence[int]], tile: int = 48, clean: Mapping[str, Any] | None = None,
                   crf: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Dense inference on every case (an ensemble if several nets), then :func:`case_rows`.

    Args:
        nets: one patch net or several (averaged in probability).
        cases: volumes with ``name``, ``image``, ``label``, ``brain`` and ``spacing`` (mm per axis)
            (:class:`deconvlab.data.brats.Case`).
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
                                       case.image, spacing=case.spacing)
        rows += [{**row, "seconds": round(seconds, 2)} for row in case_table]
        shown = labels.get("cleaned", labels["raw"])
        overlays[f"{case.name}_contours_truth_green_prediction_red"] = contour_overlay(case.image[0], case.label,
                                                                                       shown)
    return rows, overlays


SUMMED = ("hd95_missed_",)  # columns whose figure is the count over cases, not the mean
AVERAGED = ("dice_", "sensitivity_", "hd95_")


def volume_key(column: str, stage: str) -> str:
    """The logged name (without ``val/``) of a table column at a stage: ``volume_dice_whole_cleaned``."""
    return f"volume_{column}" + ("" if stage == "raw" else f"_{stage}")


def aggregate_of(column: str) -> str | None:
    """How a column's figure follows from the cases: "sum" (the count of penalised cases), "mean", or None."""
    if column.startswith(SUMMED):
        return "sum"
    return "mean" if column.startswith(AVERAGED) else None


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The figures of a table, per stage: ``volume_dice_<region>``, ``volume_dice_<region>_cleaned``, ...

    Dice, sensitivity and HD95 are the mean over cases ("per-case mean"); every case counts, a missed or
    spurious region with its HD95 penalty. ``volume_hd95_missed_<region>`` is the number of cases whose
    HD95 is that penalty.
    """
    out = {}
    for stage in STAGES:
        chosen = [r for r in rows if r["stage"] == stage]
        for column in (chosen[0] if chosen else {}):
            how = aggregate_of(column)
            if how is not None:
                values = [float(r[column]) for r in chosen]
                out[volume_key(column, stage)] = float(np.sum(values) if how == "sum" else np.mean(values))
    return out


def case_items(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per case (its stages side by side) under the logged keys: ``{"item": case,
    "val/volume_dice_whole": ..., "val/volume_dice_whole_cleaned": ..., ...}``, in the table's case order."""
    items: dict[str, dict[str, Any]] = {}
    for row in rows:
        item = items.setdefault(str(row["case"]), {"item": str(row["case"])})
        item.update({f"val/{volume_key(k, row['stage'])}": float(v) for k, v in row.items()
                     if aggregate_of(k) is not None})
    return list(items.values())


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
