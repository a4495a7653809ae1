"""2-D semantic segmentation: an image in, per-pixel class logits out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex

from deconvlab.boxes import BOX_METRIC_NAMES, BoxMetrics, boxes_from_label_maps, true_boxes
from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8


def default_palette(num_classes: int) -> np.ndarray:
    """Distinct colours for ``num_classes`` classes (golden-angle hues), uint8 [K, 3]."""
    import colorsys

    hues = [(i * 0.618033988749895) % 1.0 for i in range(num_classes)]
    return np.array([[int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.75, 0.95)] for h in hues], np.uint8)


def adopt_datamodule_palette(task) -> None:
    """A data set's own palette (e.g. CamVid's palette file) wins over generated colours, unless the task
    was given one (``task._palette_given``)."""
    palette = getattr(getattr(task.trainer, "datamodule", None), "palette", None)
    if not task._palette_given and palette is not None:
        task.palette = np.asarray(palette, np.uint8)


def colourise(labels: torch.Tensor, palette: np.ndarray, ignore_index: int | None = None) -> np.ndarray:
    """[H, W] class indices -> H x W x 3 uint8; ignored pixels are black."""
    array = labels.detach().cpu().numpy().astype(np.int64)
    out = np.zeros((*array.shape, 3), np.uint8)
    valid = (array >= 0) & (array < len(palette))
    if ignore_index is not None:
        valid &= array != ignore_index
    out[valid] = palette[array[valid]]
    return out


def render_confusion(counts: np.ndarray) -> np.ndarray:
    """A row-normalised confusion matrix (true class down, predicted across) as an RGB uint8 image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2 + 0.35 * len(counts)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (i, j), value in np.ndenumerate(rates):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                color="white" if value > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


class SegmentationTask(BaseTask):
    """Per-pixel cross-entropy; pixel accuracy, mean class accuracy and mIoU, ignoring ``ignore_index``.

    When validation batches carry a ``box`` and ``box_label`` (the largest object's box, see
    :mod:`deconvlab.tasks.localisation`), the segmenter is also scored as a localiser: its answer is the
    box around the largest connected region of predicted object pixels (``box_classes``) and that region's
    class, giving ``val/accuracy``, ``val/box_iou`` and ``val/acc_iou50`` under the same names and
    definitions as the localisation task (:class:`~deconvlab.boxes.BoxMetrics`).

    Args:
        num_classes: number of classes (void excluded).
        ignore_index: label value excluded from loss and metrics (CamVid's void is 11).
        class_weights: optional per-class loss weights (e.g. median frequency balancing).
        palette: optional [K, 3] RGB colours for the sample overlays.
        box_classes: the object classes whose regions count as boxes; None: the data module's
            ``box_classes`` (every class but the background for shapes).
        box_metrics: score the box around the largest predicted object region against each validation
            batch's box (``val/box_iou``, ``val/accuracy``, ``val/acc_iou50``); needs batches with boxes.
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    family = "segmentation"

    def __init__(self, *args, num_classes: int, ignore_index: int = -100,
                 class_weights: Sequence[float] | None = None, palette: Sequence[Sequence[int]] | None = None,
                 box_classes: Sequence[int] | None = None, box_metrics: bool = False, **kwargs) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        kwargs.setdefault("monitor", "val/miou")
        kwargs.setdefault("monitor_mode", "max")
        super().__init__(*args, **kwargs)
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        self.palette = np.asarray(palette, np.uint8) if palette is not None else default_palette(num_classes)
        self._palette_given = palette is not None
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index)
        self.box_classes = tuple(box_classes) if box_classes is not None else None
        self.box_metrics = box_metrics
        self.box_scores = BoxMetrics(ignore_index)

    def setup(self, stage: str) -> None:
        adopt_datamodule_palette(self)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.box_classes is None and getattr(datamodule, "box_classes", None) is not None:
            self.box_classes = tuple(datamodule.box_classes)

    def val_metric_names(self) -> list[str]:
        return [*super().val_metric_names(), *(BOX_METRIC_NAMES if self.box_metrics else ())]

    def build_metrics(self) -> MetricCollection:
        k, ignore = self.num_classes, self.ignore_index
        return MetricCollection({
            "pixel_acc": MulticlassAccuracy(k, average="micro", ignore_index=ignore),
            "class_acc": MulticlassAccuracy(k, average="macro", ignore_index=ignore),
            "miou": MulticlassJaccardIndex(k, average="macro", ignore_index=ignore),
        })

    def input_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["image"]

    def target_of(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["mask"]

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["mask"], weight=self.class_weights, ignore_index=self.ignore_index)
        return loss, logits

    def update_metrics(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        super().update_metrics(output, batch)
        self.confusion.update(output, batch["mask"])
        if self.box_metrics:
            self.update_box_metrics(output, batch)

    def update_box_metrics(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        """Score the box around the largest predicted object region against the batch's box."""
        boxes_true, labels_true = true_boxes(batch, "task.box_metrics")
        if self.box_classes is None:
            raise ValueError("box metrics need the object classes: set task.box_classes, or use a data "
                             "module that declares box_classes (shapes, camvid with data.box_classes)")
        boxes, labels = boxes_from_label_maps(output.argmax(dim=1), self.box_classes)
        self.box_scores.update(boxes, labels, boxes_true, labels_true)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.box_scores.update_count:
            self.log_dict({f"val/{k}": v for k, v in self.box_scores.compute().items()}, prog_bar=False,
                          sync_dist=True)
            self.box_scores.reset()
        if self._wants_samples():
            self.rendered_samples["confusion_matrix"] = render_confusion(self.confusion.compute().cpu().numpy())
        self.confusion.reset()

    on_test_epoch_end = on_validation_epoch_end

    def render_samples(self, batch: dict[str, torch.Tensor], output: torch.Tensor) -> dict[str, np.ndarray]:
        """Image | ground truth | prediction, coloured with the data set's palette."""
        predictions = output.argmax(dim=1)
        images = batch["image"]
        # Images may be normalised: stretch each to [0, 1] for display only.
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        shown = (images - low) / (high - low).clamp_min(1e-6)
        return {f"sample{i}_image_truth_prediction": side_by_side(
                    to_uint8(shown[i]), colourise(batch["mask"][i], self.palette, self.ignore_index),
                    colourise(predictions[i], self.palette))
                for i in range(images.shape[0])}
