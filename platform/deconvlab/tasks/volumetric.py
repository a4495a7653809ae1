"""Volumetric (MRI) segmentation: patches in, voxel class logits out; Dice per tumour region."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection

from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8
from deconvlab.tasks.segmentation import colourise, default_palette

# The BraTS convention: whole tumour, tumour core, enhancing tumour.
BRATS_REGIONS: dict[str, tuple[int, ...]] = {"whole": (1, 2, 3, 4), "core": (1, 3, 4), "enhancing": (4,)}


class RegionDice(Metric):
    """Dice of label *regions* (unions of classes), accumulated over all voxels of an epoch.

    Accumulating intersections and volumes (rather than averaging per-batch Dice) gives the Dice of
    the whole validation set, which is what papers report per volume or per data set.
    """

    full_state_update = False

    def __init__(self, regions: Mapping[str, Sequence[int]], **kwargs) -> None:
        super().__init__(**kwargs)
        self.regions = {name: tuple(labels) for name, labels in regions.items()}
        n = len(self.regions)
        for state in ("intersection", "predicted", "actual"):
            self.add_state(state, default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        predicted = logits.argmax(dim=1)
        for i, classes in enumerate(self.regions.values()):
            members = torch.tensor(classes, device=labels.device)
            p, t = torch.isin(predicted, members), torch.isin(labels, members)
            self.intersection[i] += (p & t).sum()
            self.predicted[i] += p.sum()
            self.actual[i] += t.sum()

    def compute(self) -> torch.Tensor:
        total = self.predicted + self.actual
        # A region absent from both prediction and truth is a perfect match, not 0/0.
        dice = torch.where(total > 0, 2 * self.intersection / total.clamp_min(1), torch.ones_like(total))
        return dice.float()


class VolumetricSegmentationTask(BaseTask):
    """Voxel-wise cross-entropy; Dice per region (and their mean) on validation.

    Labels may be dense ([B, D, H, W] or [B, H, W]) or one centre voxel per patch ([B]); the model's
    logits match them with the class axis second.

    Args:
        num_classes: number of label values (background included).
        regions: region name -> the labels it unites (BraTS whole/core/enhancing by default).
        class_weights: optional per-class loss weights.
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    def __init__(self, *args, num_classes: int, regions: Mapping[str, Sequence[int]] | None = None,
                 class_weights: Sequence[float] | None = None, **kwargs) -> None:
        self.num_classes = num_classes
        self.regions = {k: list(v) for k, v in (regions or BRATS_REGIONS).items()}
        kwargs.setdefault("monitor", "val/dice_mean")
        kwargs.setdefault("monitor_mode", "max")
        super().__init__(*args, **kwargs)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.palette = default_palette(num_classes)

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"dice": RegionDice(self.regions)})

    def flatten_metrics(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dice = values["dice"]
        flat = {f"dice_{name}": dice[i] for i, name in enumerate(self.regions)}
        flat["dice_mean"] = dice.mean()
        return flat

    def val_metric_names(self) -> list[str]:
        return [*(f"dice_{name}" for name in self.regions), "dice_mean"]

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image"]

    def target_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["label"]

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        return F.cross_entropy(logits, batch["label"], weight=self.class_weights), logits

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """Middle axial slice: first modality | truth | prediction (dense 3-D labels only)."""
        if batch["label"].ndim != 4:
            return {}
        images, labels, predictions = batch["image"], batch["label"], output.argmax(dim=1)
        samples = {}
        for i in range(images.shape[0]):
            z = labels.shape[1] // 2
            # Patch nets may predict a centred sub-volume: take the matching slice of the input.
            zi = images.shape[2] // 2
            slice_ = images[i, 0, zi]
            shown = (slice_ - slice_.min()) / (slice_.max() - slice_.min()).clamp_min(1e-6)
            h, w = labels.shape[-2:]
            top, left = (shown.shape[0] - h) // 2, (shown.shape[1] - w) // 2
            samples[f"sample{i}_slice_truth_prediction"] = side_by_side(
                to_uint8(shown[top:top + h, left:left + w]), colourise(labels[i, z], self.palette),
                colourise(predictions[i, z], self.palette))
        return samples
