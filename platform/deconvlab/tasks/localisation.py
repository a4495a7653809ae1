"""Classification + localisation: one class and one box per image.

Batch contract (the shapes set always, CamVid with ``data.box_classes``): ``image`` [B,3,H,W] float,
``box`` [B,4] float pixel box ``x0, y0, x1, y1`` (x1/y1 exclusive) of the image's largest object,
``box_label`` [B] long its class (``ignore_index`` = no object of interest: left out of loss and
metrics), and optionally ``mask`` [B,H,W] for pixel metrics. The model maps ``image`` to ``[B, K + 4]``:
class logits, then the normalised box (see :mod:`deconvlab.models.localisation`).

Loss: cross-entropy + ``l1_weight`` x smooth-L1 + ``giou_weight`` x (1 - GIoU) on the normalised box.
GIoU is the term that matches the metric: it is scale-free (a 2-pixel error costs more on a small box
than on a large one, as it does in IoU) and, unlike 1 - IoU, it still pulls a box that does not overlap
the target towards it. Smooth-L1 with a small ``beta`` (quadratic only within 2 % of the image,
linear beyond) gives every corner its own steady gradient early on, when GIoU's is weak; together they
are the DETR-style box loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import MetricCollection

from deconvlab.boxes import BOX_METRIC_NAMES, BoxMetrics, box_scores, draw_box, generalized_box_iou, true_boxes
from deconvlab.models import list_models
from deconvlab.models.localisation import split_output
from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8
from deconvlab.tasks.segmentation import (
    PresentClassScores,
    SegmentationTask,
    adopt_datamodule_palette,
    class_scores,
    confusion_counts,
    default_palette,
)

SMOOTH_L1_BETA = 0.02  # normalised units: quadratic within 2 % of the image side, L1 beyond
TRUTH_COLOUR = (255, 255, 255)


def box_to_mask(boxes: torch.Tensor, labels: torch.Tensor, height: int, width: int,
                background: int) -> torch.Tensor:
    """``[B, H, W]`` label maps: pixels whose centre is inside the normalised box get the box's class.

    How a localiser's answer is scored as a segmentation (pixel mIoU) beside the segmenters.
    """
    ys = (torch.arange(height, device=boxes.device) + 0.5) / height
    xs = (torch.arange(width, device=boxes.device) + 0.5) / width
    b = boxes[:, :, None, None]
    inside = (xs >= b[:, 0]) & (xs < b[:, 2]) & (ys[:, None] >= b[:, 1]) & (ys[:, None] < b[:, 3])
    return torch.where(inside, labels[:, None, None], torch.full_like(inside, background, dtype=torch.long))


def box_loss(pred: torch.Tensor, target: torch.Tensor, l1_weight: float, giou_weight: float) -> torch.Tensor:
    """Mean over boxes of ``l1_weight * smooth-L1 (summed over the 4 values) + giou_weight * (1 - GIoU)``."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0  # a batch without any object of interest: no box term, graph kept
    l1 = F.smooth_l1_loss(pred, target, beta=SMOOTH_L1_BETA, reduction="none").sum(dim=-1)
    giou = generalized_box_iou(pred, target)
    return (l1_weight * l1 + giou_weight * (1 - giou)).mean()


class LocalisationTask(BaseTask):
    """Class + box per image: cross-entropy plus box regression; accuracy, box IoU, accuracy at IoU 0.5.

    Metrics (``val/``): ``accuracy`` (class right), ``box_iou`` (mean IoU of predicted and true box),
    ``acc_iou50`` (class right **and** IoU >= 0.5: a correct localisation), means over the images with an
    object of interest; and, when the batch has a ``mask`` and ``background_class`` is set, ``miou``: the
    predicted box filled with the predicted class on the background class, scored per pixel like a
    segmentation (the split's present-class mIoU, :func:`deconvlab.tasks.segmentation.class_scores`).

    Args:
        num_classes: classes the model scores.
        ignore_index: a ``box_label`` (and mask value) meaning "no object": left out of loss and metrics.
        background_class: the mask's background class for the box-as-mask ``miou``; None: no ``miou``.
        l1_weight, giou_weight: weights of the two box-loss terms (module docstring says why both).
        palette: optional [K, 3] RGB colours (boxes in samples are drawn in the predicted class's colour).
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    family = "localisation"

    def __init__(self, *args, num_classes: int, ignore_index: int = -100, background_class: int | None = 0,
                 l1_weight: float = 1.0, giou_weight: float = 1.0, palette: Sequence[Sequence[int]] | None = None,
                 **kwargs) -> None:
        self.num_classes, self.ignore_index, self.background_class = num_classes, ignore_index, background_class
        kwargs.setdefault("monitor", "val/acc_iou50")
        kwargs.setdefault("monitor_mode", "max")
        super().__init__(*args, **kwargs)
        self.l1_weight, self.giou_weight = l1_weight, giou_weight
        self.palette = np.asarray(palette, np.uint8) if palette is not None else default_palette(num_classes)
        self._palette_given = palette is not None

    def setup(self, stage: str) -> None:
        adopt_datamodule_palette(self)

    def build_metrics(self) -> MetricCollection:
        metrics: dict[str, nn.Module] = {"box": BoxMetrics(self.ignore_index)}
        if self.background_class is not None:
            metrics["miou"] = PresentClassScores(self.num_classes, self.ignore_index, names=("miou",))
        return MetricCollection(metrics)

    def val_metric_names(self) -> list[str]:
        return [*BOX_METRIC_NAMES, *(["miou"] if self.background_class is not None else [])]

    def item_aggregates(self) -> dict[str, str]:
        means = {f"val/{name}": "mean" for name in BOX_METRIC_NAMES}
        return means | ({"val/miou": "pooled"} if self.background_class is not None else {})

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image"]

    def targets_of(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The true normalised boxes and classes of a batch."""
        return true_boxes(batch, "the localisation task")

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        output = self(batch["image"])
        logits, boxes = split_output(output)
        true_boxes, labels = self.targets_of(batch)
        keep = labels != self.ignore_index
        classification = (F.cross_entropy(logits, labels, ignore_index=self.ignore_index) if keep.any()
                           else logits.sum() * 0.0)
        loss = classification + box_loss(boxes[keep], true_boxes[keep], self.l1_weight, self.giou_weight)
        return loss, output

    def update_metrics(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        logits, boxes = split_output(output)
        true_boxes, labels = self.targets_of(batch)
        predicted = logits.argmax(dim=1)
        self.val_metrics["box"].update(boxes, predicted, true_boxes, labels)
        values = {}
        if "miou" in self.val_metrics and "mask" in batch:
            height, width = batch["mask"].shape[-2:]
            as_mask = box_to_mask(boxes, predicted, height, width, self.background_class)
            self.val_metrics["miou"].update(as_mask, batch["mask"])
            if self.record_items:
                per_image = confusion_counts(as_mask, batch["mask"], self.num_classes, self.ignore_index, True)
                values["val/miou"] = class_scores(per_image)["miou"]
        if self.record_items:
            scores = box_scores(boxes, predicted, true_boxes, labels, self.ignore_index)
            self.record(batch, {f"val/{k}": v for k, v in scores.items()} | values)

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """The image with the true box (white) and the predicted box (in the predicted class's colour)."""
        logits, boxes = split_output(output)
        true_boxes, _ = self.targets_of(batch)
        images = batch["image"]
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        shown = (images - low) / (high - low).clamp_min(1e-6)  # stretched for display only
        samples = {}
        for i in range(images.shape[0]):
            picture = to_uint8(shown[i])
            colour = self.palette[int(logits[i].argmax()) % len(self.palette)]
            drawn = draw_box(draw_box(picture, true_boxes[i].tolist(), TRUTH_COLOUR), boxes[i].tolist(), colour)
            samples[f"sample{i}_image_truth_white_prediction"] = side_by_side(picture, drawn)
        return samples


def task_for_model(model: nn.Module, *, num_classes: int, ignore_index: int = -100,
                   palette: Sequence[Sequence[int]] | None = None, background_class: int | None = 0,
                   l1_weight: float = 1.0, giou_weight: float = 1.0, **kwargs) -> BaseTask:
    """The localisation task for a localiser, the segmentation task (with box metrics) for a segmenter.

    What lets one sweep put both formulations side by side with ``model`` as its only grid key: the
    model's registered family picks the task, and both report ``val/box_iou``, ``val/accuracy``,
    ``val/acc_iou50`` and ``val/miou`` on the same data.

    Args:
        model: the network: an instance of a model class the catalogue lists for the localisation
            family (:func:`deconvlab.models.list_models`) gets the localisation task, any other model
            the segmentation task.
        num_classes, ignore_index, palette: shared by both tasks.
        background_class, l1_weight, giou_weight: localisation only (see :class:`LocalisationTask`).
        **kwargs: :class:`~deconvlab.tasks.base.BaseTask` arguments (optimizer, monitor, ...).
    """
    localisers = tuple(spec.model_class for spec in list_models(LocalisationTask.family))
    if isinstance(model, localisers):
        return LocalisationTask(model, num_classes=num_classes, ignore_index=ignore_index, palette=palette,
                                background_class=background_class, l1_weight=l1_weight,
                                giou_weight=giou_weight, **kwargs)
    return SegmentationTask(model, num_classes=num_classes, ignore_index=ignore_index, palette=palette,
                            box_metrics=True, **kwargs)
