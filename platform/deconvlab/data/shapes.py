"""Synthetic shapes for segmentation: filled squares, disks and triangles on a textured, noisy background.

The fresh-install default data of the segmentation task and the data of its fast tests. Every image is
a pure function of ``(seed, split, index)`` and of its size, so a data set is reproducible on any worker,
in any order, at any resolution, without files. The class of an object is its *shape*: colours are
random for every class, and the background is a smooth random colour field with a random stripe
texture, so a net has to look at outlines, not at colours.

Each sample also carries the box of its single largest (visible) object and that object's class, for
the classification + localisation baseline (issue 13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from deconvlab.data.base import SplitDataModule
from deconvlab.errors import DataError

SHAPE_CLASSES = ("background", "square", "disk", "triangle")
SHAPE_PALETTE = ((40, 40, 40), (230, 60, 50), (60, 190, 75), (60, 100, 230))
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
# Per data set (and per loader worker); past it, samples are drawn on every access (64x64 sets of
# ~5,000 images fit).
SHAPES_CACHE_BYTES = 256 * 2**20
MIN_CONTRAST = 0.35  # L1 distance (summed over RGB) between an object's colour and the background's mean


@dataclass(frozen=True)
class ShapesConfig:
    """How shape images are drawn.

    Attributes:
        height, width: image size in pixels.
        min_objects, max_objects: objects per image (inclusive range).
        min_size, max_size: object size (circumradius) as a fraction of the shorter image side.
        noise: standard deviation of the additive Gaussian pixel noise (images are in [0, 1]).
    """

    height: int = 64
    width: int = 64
    min_objects: int = 1
    max_objects: int = 3
    min_size: float = 0.12
    max_size: float = 0.3
    noise: float = 0.08


@dataclass
class ShapesSample:
    image: np.ndarray  # H x W x 3 float32 in [0, 1]
    mask: np.ndarray  # H x W uint8 class index
    box: np.ndarray  # x0, y0, x1, y1 of the largest object, in pixels, x1/y1 exclusive
    box_label: int  # the largest object's class


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    coarse = torch.from_numpy(rng.uniform(0.15, 0.85, size=(1, 3, 4, 4)))
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    field = field.permute(1, 2, 0).numpy()
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    angle, period = rng.uniform(0, math.pi), rng.uniform(0.05, 0.25)
    stripes = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
    return field + rng.uniform(0.03, 0.12) * stripes[..., None]


def _polygon(centre: tuple[float, float], radius: float, corners: int, angle: float) -> np.ndarray:
    theta = angle + 2 * math.pi * np.arange(corners) / corners
    return np.stack([centre[0] + radius * np.sin(theta), centre[1] + radius * np.cos(theta)], axis=1)


def _shape_pixels(kind: int, centre: tuple[float, float], radius: float, angle: float,
                  shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    from skimage.draw import disk, polygon

    if SHAPE_CLASSES[kind] == "disk":
        return disk(centre, radius, shape=shape)
    corners = 4 if SHAPE_CLASSES[kind] == "square" else 3
    vertices = _polygon(centre, radius, corners, angle)
    return polygon(vertices[:, 0], vertices[:, 1], shape=shape)


def _object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    for _ in range(100):
        colour = rng.uniform(0, 1, size=3)
        if np.abs(colour - background_mean).sum() >= MIN_CONTRAST:
            return colour
    return 1 - background_mean  # a colour far from the background, should the draws all be close


def make_shapes_sample(seed: int, split: str, index: int,
                       config: ShapesConfig = ShapesConfig()) -> ShapesSample:
    """Draw sample ``index`` of ``split`` (a pure function of its arguments).

    Objects are drawn in turn, later ones occluding earlier ones; the mask records what is visible.
    """
    if split not in SPLIT_IDS:
        raise DataError(f"shapes split must be one of {sorted(SPLIT_IDS)}, got {split!r}", "data.split",
                        "use data.split=val or data.split=test")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    h, w = config.height, config.width
    image = _background(rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    instances = np.full((h, w), -1, np.int32)
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    kinds = rng.integers(1, len(SHAPE_CLASSES), size=count)
    for i, kind in enumerate(kinds):
        radius = max(1.0, rng.uniform(config.min_size, config.max_size) * min(h, w))
        centre = (rng.uniform(0, h - 1), rng.uniform(0, w - 1))
        rows, cols = _shape_pixels(int(kind), centre, radius, rng.uniform(0, 2 * math.pi), (h, w))
        image[rows, cols] = _object_colour(rng, image.mean(axis=(0, 1)))
        mask[rows, cols], instances[rows, cols] = kind, i
    image = np.clip(image + rng.normal(0, config.noise, image.shape), 0, 1).astype(np.float32)
    box, box_label = _largest_object_box(instances, kinds)
    return ShapesSample(image, mask, box, box_label)


def _largest_object_box(instances: np.ndarray, kinds: np.ndarray) -> tuple[np.ndarray, int]:
    areas = np.bincount(instances[instances >= 0], minlength=len(kinds))
    if areas.max() == 0:  # every object fell between pixel centres (only on tiny images)
        return np.zeros(4, np.float32), 0
    largest = int(areas.argmax())
    rows, cols = np.nonzero(instances == largest)
    box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)
    return box, int(kinds[largest])


class ShapesDataset(Dataset):
    """``length`` generated samples of one split as dicts: image, mask, box, box_label."""

    def __init__(self, length: int, split: str, seed: int, config: ShapesConfig) -> None:
        make_shapes_sample(seed, split, 0, config)  # fail early on a bad split or config
        self.length, self.split, self.seed, self.config = length, split, seed, config
        # Drawn once, then served from memory: every epoch (and, with persistent workers, every worker)
        # would otherwise draw the same pure function of (seed, split, index) again.
        self._cache: dict[int, ShapesSample] = {}
        self._cache_bytes = 0

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"shapes index {index} out of range for a set of {self.length}")
        sample = self._sample(index)
        return {"image": torch.from_numpy(sample.image).permute(2, 0, 1).contiguous(),
                "mask": torch.from_numpy(sample.mask).long(),
                "box": torch.from_numpy(sample.box),
                "box_label": torch.tensor(sample.box_label)}

    def _sample(self, index: int) -> ShapesSample:
        sample = self._cache.get(index)
        if sample is None:
            sample = make_shapes_sample(self.seed, self.split, index, self.config)
            size = sample.image.nbytes + sample.mask.nbytes
            if self._cache_bytes + size <= SHAPES_CACHE_BYTES:
                self._cache[index], self._cache_bytes = sample, self._cache_bytes + size
        return sample


class ShapesDataModule(SplitDataModule):
    """Synthetic shapes segmentation (4 classes: background, square, disk, triangle).

    Args:
        root: must be None: the images are generated. To get them as files (CamVid layout), see
            :func:`write_shapes_folder`.
        split: the split the val/test dataloaders read ("val" or "test").
        height, width: image size.
        num_train, num_val: images per epoch in the training split and in the evaluated split.
        min_objects, max_objects, min_size, max_size, noise: see :class:`ShapesConfig`.
        batch_size, num_workers, seed: the usual; the seed fixes every image.
        num_classes: must be 4; declared so configs can interpolate ``${data.num_classes}``.
        ignore_index: label of ignored pixels (none are generated; kept for the task's loss).
        palette: RGB colour per class for overlays.
    """

    def __init__(self, root: str | None = None, split: str = "val", height: int = 64, width: int = 64,
                 num_train: int = 512, num_val: int = 64, min_objects: int = 1, max_objects: int = 3,
                 min_size: float = 0.12, max_size: float = 0.3, noise: float = 0.08, batch_size: int = 16,
                 num_workers: int = 0, seed: int = 0, num_classes: int = len(SHAPE_CLASSES),
                 ignore_index: int = 255, palette: list[list[int]] | None = None) -> None:
        super().__init__(batch_size, num_workers, seed)
        if root is not None:
            raise DataError(f"data.root={root!r}: the shapes set is generated, not read", "data.root",
                            "drop data.root, or point data=camvid at a folder (write_shapes_folder makes one)")
        if num_classes != len(SHAPE_CLASSES):
            raise DataError(f"data.num_classes must be {len(SHAPE_CLASSES)} for shapes {SHAPE_CLASSES}",
                            "data.num_classes", f"set data.num_classes={len(SHAPE_CLASSES)} or leave it out")
        self.split = split
        self.config = ShapesConfig(height, width, min_objects, max_objects, min_size, max_size, noise)
        self.num_train, self.num_val = num_train, num_val
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = SHAPE_CLASSES
        self.box_classes = tuple(range(1, len(SHAPE_CLASSES)))  # what `box`/`box_label` are boxes of
        self.palette = [list(c) for c in (palette or SHAPE_PALETTE)]

    def setup(self, stage: str | None = None) -> None:
        self.train_set = ShapesDataset(self.num_train, "train", self.seed, self.config)
        self.eval_set = ShapesDataset(self.num_val, self.split, self.seed, self.config)



def write_shapes_folder(root: str | Path, sizes: dict[str, int], seed: int = 0,
                        config: ShapesConfig = ShapesConfig()) -> Path:
    """Write shapes as files in the CamVid (SegNet) layout: ``<split>/*.jpg`` and ``<split>annot/*.png``.

    Args:
        root: the folder to create (or fill).
        sizes: images per split, e.g. ``{"train": 8, "val": 4}``.
        seed: the generator seed.
        config: image size and drawing parameters.

    Returns:
        The root, ready for ``CamVidDataModule(root=..., num_classes=4)``.
    """
    from PIL import Image

    root = Path(root)
    for split, count in sizes.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for index in range(count):
            sample = make_shapes_sample(seed, split, index, config)
            stem = f"shapes_{split}_{index:05d}"
            Image.fromarray((sample.image * 255 + 0.5).astype(np.uint8)).save(root / split / f"{stem}.jpg",
                                                                             quality=95)
            Image.fromarray(sample.mask).save(root / f"{split}annot" / f"{stem}.png")
    return root
