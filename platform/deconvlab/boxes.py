"""Bounding boxes: IoU, generalised IoU, boxes around masks, accumulated box metrics, and drawing.

Boxes are ``(x0, y0, x1, y1)``. Data modules give them in pixels with ``x1``/``y1`` exclusive (a box
around pixel columns 2..5 is ``x0=2, x1=6``), so dividing by the image's width and height gives the
normalised ``[0, 1]`` coordinates that the localisation net predicts and that metrics compare.
IoU is unchanged by that per-axis scaling, so pixel and normalised boxes give the same IoU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of ``[..., 4]`` boxes; an inverted box counts as empty."""
    return (boxes[..., 2] - boxes[..., 0]).clamp_min(0) * (boxes[..., 3] - boxes[..., 1]).clamp_min(0)


def _intersection_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (bottom_right - top_left).clamp_min(0).prod(dim=-1)
    return inter, box_area(a) + box_area(b) - inter


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise IoU of two ``[..., 4]`` box tensors (0 where both boxes are empty)."""
    inter, union = _intersection_union(a, b)
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise generalised IoU (Rezatofighi et al. 2019): ``IoU - (|C| - |A u B|) / |C|``.

    ``C`` is the smallest box enclosing both; GIoU is in [-1, 1] and, unlike IoU, still says how far
    apart two disjoint boxes are, so ``1 - GIoU`` has a gradient before the boxes overlap.
    """
    inter, union = _intersection_union(a, b)
    iou = inter / (union + eps)
    enclosing = box_area(torch.cat([torch.minimum(a[..., :2], b[..., :2]),
                                    torch.maximum(a[..., 2:], b[..., 2:])], dim=-1))
    return iou - (enclosing - union) / (enclosing + eps)


def normalise_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel boxes (x1/y1 exclusive) -> ``[0, 1]`` coordinates of an image of ``height`` x ``width``."""
    return boxes.float() / boxes.new_tensor([width, height, width, height], dtype=torch.float32)


def true_boxes(batch: dict[str, torch.Tensor], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's true boxes, normalised to [0, 1], and their classes.

    Raises:
        KeyError: the batch carries no boxes (``what`` says who needed them).
    """
    if "box" not in batch or "box_label" not in batch:
        raise KeyError(f"{what} needs batches with 'box' and 'box_label', got {sorted(batch)}: "
                       "use data=shapes, or data=camvid with data.box_classes=[8] (car)")
    height, width = batch["image"].shape[-2:]
    return normalise_boxes(batch["box"], height, width), batch["box_label"].long()


def largest_component_box(mask: np.ndarray, classes: Sequence[int]) -> tuple[np.ndarray, int | None]:
    """The box of the largest connected (4-connected) region of any one of ``classes`` in a label mask.

    Args:
        mask: H x W class indices.
        classes: the object classes; each class's regions are separate objects.

    Returns:
        ``(box, label)``: the pixel box ``x0, y0, x1, y1`` (x1/y1 exclusive) and the region's class, or
        ``(zeros, None)`` when none of ``classes`` occurs.
    """
    from scipy import ndimage

    best_area, best_box, best_label = 0, np.zeros(4, np.float32), None
    for label in classes:
        regions, count = ndimage.label(mask == label)
        if count == 0:
            continue
        areas = np.bincount(regions.ravel())[1:]
        largest = int(areas.argmax())
        if areas[largest] > best_area:
            rows, cols = ndimage.find_objects(regions)[largest]
            best_area, best_label = int(areas[largest]), int(label)
            best_box = np.array([cols.start, rows.start, cols.stop, rows.stop], np.float32)
    return best_box, best_label


def boxes_from_label_maps(labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image of ``[B, H, W]`` predicted labels: the normalised box and class of its largest object.

    This is how a segmenter "localises": the box around the largest connected region of predicted
    object pixels. Images with no object pixel get an empty box and class -1 (a miss).
    """
    height, width = labels.shape[-2:]
    boxes, found = [], []
    for label_map in labels.detach().cpu().numpy():
        box, label = largest_component_box(label_map, classes)
        boxes.append(box)
        found.append(-1 if label is None else label)
    pixel_boxes = torch.from_numpy(np.stack(boxes)).to(labels.device)
    return normalise_boxes(pixel_boxes, height, width), torch.tensor(found, device=labels.device)


def box_scores(pred_boxes: torch.Tensor, pred_labels: torch.Tensor, true_boxes: torch.Tensor,
               true_labels: torch.Tensor, ignore_index: int | None = None,
               iou_threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Per image: ``accuracy`` (1/0), ``box_iou`` and ``acc_iou50`` (1/0), as in :class:`BoxMetrics`.

    Images whose true class is ``ignore_index`` (no object of interest) get NaN: they have no score, and
    :class:`BoxMetrics` (the mean over images) leaves them out.
    """
    iou = box_iou(pred_boxes.float(), true_boxes.float()).double()
    right = (pred_labels == true_labels).double()
    scores = {"accuracy": right, "box_iou": iou, "acc_iou50": right * (iou >= iou_threshold).double()}
    if ignore_index is None:
        return scores
    skipped = true_labels == ignore_index
    return {k: torch.where(skipped, torch.nan, v) for k, v in scores.items()}


class BoxMetrics(Metric):
    """Classification + localisation metrics over all images of an epoch.

    * ``accuracy``: the predicted class is the true class;
    * ``box_iou``: mean IoU of the predicted box with the true box (whatever the predicted class);
    * ``acc_iou50``: the predicted class is right **and** the box IoU is at least 0.5 (the usual
      "correct localisation" of the ILSVRC localisation task, with one guess per image).

    Images whose true class is ``ignore_index`` (no object of interest) are left out.
    """

    full_state_update = False

    def __init__(self, ignore_index: int | None = None, iou_threshold: float = 0.5) -> None:
        super().__init__()
        self.ignore_index, self.iou_threshold = ignore_index, iou_threshold
        for name in ("correct", "iou_sum", "hits", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_boxes: torch.Tensor, pred_labels: torch.Tensor, true_boxes: torch.Tensor,
               true_labels: torch.Tensor) -> None:
        keep = true_labels != self.ignore_index if self.ignore_index is not None else true_labels == true_labels
        scores = box_scores(pred_boxes[keep], pred_labels[keep], true_boxes[keep], true_labels[keep],
                            iou_threshold=self.iou_threshold)
        self.correct += scores["accuracy"].sum()
        self.iou_sum += scores["box_iou"].sum()
        self.hits += scores["acc_iou50"].sum()
        self.count += keep.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp_min(1)
        return {"accuracy": (self.correct / count).float(), "box_iou": (self.iou_sum / count).float(),
                "acc_iou50": (self.hits / count).float()}


BOX_METRIC_NAMES = ("accuracy", "box_iou", "acc_iou50")


def draw_box(image: np.ndarray, box: Sequence[float], colour: Sequence[int], thickness: int = 1) -> np.ndarray:
    """A copy of an H x W x 3 uint8 image with a normalised box's outline drawn inside its edge pixels."""
    out = image.copy()
    height, width = out.shape[:2]
    x0, x1 = _pixel_span(box[0], box[2], width)
    y0, y1 = _pixel_span(box[1], box[3], height)
    t = max(1, thickness)
    for rows, cols in ((slice(y0, y0 + t), slice(x0, x1)), (slice(max(y0, y1 - t), y1), slice(x0, x1)),
                       (slice(y0, y1), slice(x0, x0 + t)), (slice(y0, y1), slice(max(x0, x1 - t), x1))):
        out[rows, cols] = colour
    return out


def _pixel_span(low: float, high: float, size: int) -> tuple[int, int]:
    """Normalised ``[low, high]`` -> pixel indices ``[start, stop)`` inside ``size``, at least one pixel."""
    start = min(max(int(round(float(low) * size)), 0), size - 1)
    return start, min(max(int(round(float(high) * size)), start + 1), size)
