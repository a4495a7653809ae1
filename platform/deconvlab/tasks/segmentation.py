"""2-D semantic segmentation: an image in, per-pixel class logits out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassConfusionMatrix

from deconvlab.boxes import BOX_METRIC_NAMES, BoxMetrics, box_scores, boxes_from_label_maps, true_boxes
from deconvlab.tasks.base import BaseTask, side_by_side, to_uint8

CLASS_SCORE_NAMES = ("pixel_acc", "class_acc", "miou")
# Training batches counted for a classifier's class-prior start: enough for the frequencies of a few % of pixels.
PRIOR_BATCHES = 16


def labelled(target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """Where ``target`` holds a class: inside ``0..num_classes-1`` and not ``ignore_index`` (void)."""
    valid = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        valid &= target != ignore_index
    return valid


def confusion_counts(predicted: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = None, per_item: bool = False) -> torch.Tensor:
    """Confusion counts (rows: true class, columns: predicted) of label maps, void pixels left out.

    Args:
        predicted: ``[B, ...]`` predicted classes.
        target: ``[B, ...]`` true classes; ``ignore_index`` (and anything outside ``0..K-1``) is void.
        num_classes: K.
        ignore_index: the void label.
        per_item: one ``[K, K]`` matrix per batch item (``[B, K, K]``) instead of one for the batch.
    """
    k = num_classes
    valid = labelled(target, k, ignore_index)
    cell = target.long() * k + predicted.long().clamp(0, k - 1)
    if not per_item:
        return torch.bincount(cell[valid], minlength=k * k).view(k, k)
    item = torch.arange(target.shape[0], device=target.device).view(-1, *([1] * (target.dim() - 1)))
    flat = (item * k * k + cell)[valid]
    return torch.bincount(flat, minlength=target.shape[0] * k * k).view(-1, k, k)


def class_scores(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pixel accuracy, mean class accuracy and mIoU of ``[..., K, K]`` confusion counts.

    The class means are over the classes PRESENT in the ground truth (a row with any pixel): a class
    absent from the truth counts neither as 0 nor as 1 ("present-class mean", docs/metrics.md); void is
    already left out of the counts. Without any labelled pixel every score is NaN.
    """
    counts = confusion.double()
    tp = counts.diagonal(dim1=-2, dim2=-1)
    support, predicted = counts.sum(-1), counts.sum(-2)
    present = support > 0
    n_present = present.sum(-1)
    iou = tp / (support + predicted - tp).clamp_min(1)
    recall = tp / support.clamp_min(1)

    def present_mean(per_class: torch.Tensor) -> torch.Tensor:
        return torch.where(n_present > 0, (per_class * present).sum(-1) / n_present.clamp_min(1), torch.nan)

    total = support.sum(-1)
    return {"pixel_acc": torch.where(total > 0, tp.sum(-1) / total.clamp_min(1), torch.nan),
            "class_acc": present_mean(recall), "miou": present_mean(iou)}


class PresentClassScores(Metric):
    """Pixel accuracy, mean class accuracy and mIoU from the confusion counts summed over the split.

    Accepts logits ``[B, K, ...]`` (argmax taken) or labels ``[B, ...]`` against ``[B, ...]`` targets.
    Class means follow :func:`class_scores` (present classes only); an epoch without any labelled pixel
    scores 0, so a never-updated metric cannot stop training as "diverged".

    Args:
        num_classes: K.
        ignore_index: the void label.
        names: which of ``pixel_acc``, ``class_acc`` and ``miou`` :meth:`compute` returns.
    """

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int | None = None,
                 names: tuple[str, ...] = CLASS_SCORE_NAMES, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.ignore_index, self.names = num_classes, ignore_index, tuple(names)
        self.add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        predicted = output.argmax(dim=1) if output.dim() == target.dim() + 1 else output
        self.confusion += confusion_counts(predicted, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, torch.Tensor]:
        scores = class_scores(self.confusion)
        return {name: torch.nan_to_num(scores[name], nan=0.0).float() for name in self.names}


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


def class_frequencies(batches: Iterable[dict[str, torch.Tensor]], num_classes: int,
                      ignore_index: int | None = None) -> torch.Tensor:
    """Each class's share of the labelled pixels of ``batches`` (their ``mask``), void excluded; every class
    counts one pixel more than seen, so that a class absent from these batches keeps a finite log."""
    counts = torch.ones(num_classes, dtype=torch.float64)
    for batch in batches:
        mask = batch["mask"].flatten()
        counts += torch.bincount(mask[labelled(mask, num_classes, ignore_index)], minlength=num_classes).to(counts)
    return (counts / counts.sum()).float()


class SegmentationTask(BaseTask):
    """Per-pixel cross-entropy; pixel accuracy, mean class accuracy and mIoU, ignoring ``ignore_index``.

    ``val/miou`` and ``val/class_acc`` are present-class means over the split: from the confusion counts
    summed over all validation pixels, averaged over the classes that occur in the split's ground truth
    (:func:`class_scores`). Per-item rows hold the same three scores of each image on its own.

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
        class_prior_init: before fitting, start the model's classifier at the class frequencies of the first
            ``PRIOR_BATCHES`` training batches, if the model has an ``init_class_prior`` (DeconvNet); other
            models keep their start. A resumed run's checkpoint overwrites it (Lightning restores weights
            after ``setup``).
        **kwargs: see :class:`~deconvlab.tasks.base.BaseTask`.
    """

    family = "segmentation"

    def __init__(self, *args, num_classes: int, ignore_index: int = -100,
                 class_weights: Sequence[float] | None = None, palette: Sequence[Sequence[int]] | None = None,
                 box_classes: Sequence[int] | None = None, box_metrics: bool = False,
                 class_prior_init: bool = False, **kwargs) -> None:
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
        self.class_prior_init = class_prior_init and hasattr(self.model, "init_class_prior")

    def setup(self, stage: str) -> None:
        adopt_datamodule_palette(self)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.box_classes is None and getattr(datamodule, "box_classes", None) is not None:
            self.box_classes = tuple(datamodule.box_classes)
        if self.class_prior_init and stage == "fit" and datamodule is not None:
            self.model.init_class_prior(class_frequencies(islice(datamodule.train_dataloader(), PRIOR_BATCHES),
                                                          self.num_classes, self.ignore_index))

    def build_metrics(self) -> MetricCollection:
        return MetricCollection({"scores": PresentClassScores(self.num_classes, self.ignore_index)})

    def val_metric_names(self) -> list[str]:
        return [*CLASS_SCORE_NAMES, *(BOX_METRIC_NAMES if self.box_metrics else ())]

    def item_aggregates(self) -> dict[str, str]:
        pooled = {f"val/{name}": "pooled" for name in CLASS_SCORE_NAMES}
        return pooled | ({f"val/{name}": "mean" for name in BOX_METRIC_NAMES} if self.box_metrics else {})

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
        per_box = self.update_box_metrics(output, batch) if self.box_metrics else {}
        if self.record_items:
            per_image = confusion_counts(output.argmax(dim=1), batch["mask"], self.num_classes, self.ignore_index,
                                         per_item=True)
            values = {f"val/{k}": v for k, v in class_scores(per_image).items()}
            self.record(batch, values | {f"val/{k}": v for k, v in per_box.items()})

    def update_box_metrics(self, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Score the box around the largest predicted object region against the batch's box.

        Returns:
            The per-image box scores (:func:`deconvlab.boxes.box_scores`).
        """
        boxes_true, labels_true = true_boxes(batch, "task.box_metrics")
        if self.box_classes is None:
            raise ValueError("box metrics need the object classes: set task.box_classes, or use a data "
                             "module that declares box_classes (shapes, camvid with data.box_classes)")
        boxes, labels = boxes_from_label_maps(output.argmax(dim=1), self.box_classes)
        self.box_scores.update(boxes, labels, boxes_true, labels_true)
        return box_scores(boxes, labels, boxes_true, labels_true, self.ignore_index)

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
