"""CamVid road scenes (SegNet layout) for 2-D semantic segmentation.

Layout of a root folder (the SegNet tutorial's, and ``/work/shared/data/camvid``)::

    <root>/<split>/<stem>.jpg|png        RGB images
    <root>/<split>annot/<stem>.png       8-bit labels: 0..num_classes-1, ignore_index (11) = void
    <root>/camvid11_palette.png          optional: the class colours, one pixel per class

Any folder laid out like this works (``data.root=...``), with any number of classes. Every file is
checked when it is read, and a bad one is named in the error: unreadable image, image and mask of
different sizes, label values outside the classes, a split without images, an image without mask.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deconvlab.boxes import largest_component_box
from deconvlab.console import progress
from deconvlab.data.base import SplitDataModule
from deconvlab.errors import DataError, MissingDataError

CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
                  "pedestrian", "bicyclist")
# SegNet's colours, used when the root has no camvid11_palette.png.
CAMVID_PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
                  (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
CAMVID_VOID = 11
PALETTE_FILE = "camvid11_palette.png"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def default_camvid_root() -> Path:
    """``$DECONVLAB_DATA_DIR/camvid``, else the ``shared/data/camvid`` beside the project checkout."""
    if "DECONVLAB_DATA_DIR" in os.environ:
        return Path(os.environ["DECONVLAB_DATA_DIR"]) / "camvid"
    return Path(__file__).resolve().parents[3].parent / "shared" / "data" / "camvid"


def list_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of ``split``, sorted by file name; a clear error if the split is unusable."""
    image_dir, mask_dir = root / split, root / f"{split}annot"
    if not image_dir.is_dir():
        raise MissingDataError(f"CamVid split {split!r}: no folder {image_dir} (expected <root>/{split}/ "
                               f"and <root>/{split}annot/)", "data.root", "set data.root to such a folder")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        suffixes = "/".join(IMAGE_SUFFIXES)
        raise MissingDataError(f"CamVid split {split!r} is empty: no {suffixes} images in {image_dir}",
                               "data.split", "add images or choose another split")
    pairs = []
    for image in images:
        mask = mask_dir / f"{image.stem}.png"
        if not mask.is_file():
            raise MissingDataError(f"image {image} has no label file {mask}", str(mask),
                                   "add the label file or remove the image")
        pairs.append((image, mask))
    return pairs


def _read(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as picture:
            return np.asarray(picture)
    except Exception as error:  # noqa: BLE001 - PIL raises OSError, SyntaxError, DecompressionBombError...
        raise DataError(f"cannot read {path}: {error}", str(path), "replace or remove the damaged file") from error


def read_pair(image_path: Path, mask_path: Path, num_classes: int,
              ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """An H x W x 3 uint8 image and its H x W label array, checked against each other and the classes."""
    image, mask = _read(image_path), _read(mask_path)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = image[..., :3]
    if mask.ndim != 2:
        raise DataError(f"label file {mask_path} must be a single-channel class-index image, "
                        f"got shape {mask.shape}", str(mask_path), "save labels as 8-bit class indices")
    if mask.shape != image.shape[:2]:
        raise DataError(f"label file {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} "
                        f"is {image.shape[1]}x{image.shape[0]} (width x height)", str(mask_path),
                        "give every image a label file of its own size")
    bad = np.unique(mask[(mask >= num_classes) & (mask != ignore_index)])
    if bad.size:
        raise DataError(f"label file {mask_path} has values {bad.tolist()} outside the classes "
                        f"0..{num_classes - 1} (void = {ignore_index})", str(mask_path),
                        "check data.num_classes and data.ignore_index")
    return image, mask


def read_palette(root: Path, num_classes: int) -> list[list[int]]:
    """Class colours from ``<root>/camvid11_palette.png`` if present, SegNet's otherwise."""
    path = root / PALETTE_FILE
    if path.is_file():
        picture = _read(path)
        colours = picture.reshape(-1, picture.shape[-1] if picture.ndim == 3 else 1)[:, :3]
        if colours.shape[1] == 1:  # a grey palette image
            colours = np.repeat(colours, 3, axis=1)
    else:
        colours = np.array(CAMVID_PALETTE)
    if len(colours) < num_classes:  # more classes than colours: grey levels for the rest
        extra = np.linspace(32, 224, num_classes - len(colours)).astype(int)
        colours = np.concatenate([colours, np.repeat(extra[:, None], 3, axis=1)])
    return colours[:num_classes].astype(int).tolist()


def median_frequency_weights(masks: Iterable[np.ndarray], num_classes: int,
                             ignore_index: int) -> torch.Tensor:
    """Median-frequency class balancing (Eigen & Fergus; used by SegNet on CamVid).

    ``weight_c = median(freq) / freq_c`` where ``freq_c`` is the pixel count of class c divided by the
    pixel count of the images in which c appears. Classes that never appear get weight 0.
    """
    pixels = np.zeros(num_classes)
    present_in = np.zeros(num_classes)
    for mask in masks:
        valid = mask[mask != ignore_index].astype(np.int64)
        counts = np.bincount(valid, minlength=num_classes)[:num_classes]
        pixels += counts
        present_in += (counts > 0) * valid.size
    seen = present_in > 0
    freq = np.zeros(num_classes)
    freq[seen] = pixels[seen] / present_in[seen]
    weights = np.zeros(num_classes)
    weights[seen] = np.median(freq[seen]) / freq[seen]
    return torch.tensor(weights, dtype=torch.float32)


def median_frequency_class_weights(root: str | None = None, split: str = "train",
                                   num_classes: int = len(CAMVID_CLASSES),
                                   ignore_index: int = CAMVID_VOID) -> list[float]:
    """Median-frequency weights of a folder's ``split``, as a plain list for ``task.class_weights``.

    Meant to be instantiated by Hydra inside the task config (see ``conf/data/camvid.yaml``).
    """
    folder = Path(root) if root is not None else default_camvid_root()
    pairs = list_pairs(folder, split)
    masks = (read_pair(image, mask, num_classes, ignore_index)[1]
             for image, mask in progress(pairs, f"class weights: scanning {len(pairs)} {split} masks"))
    return median_frequency_weights(masks, num_classes, ignore_index).tolist()


def build_transform(image_size: tuple[int, int] | None, augment: bool, ignore_index: int, seed: int = 0,
                    crop: tuple[int, int] | None = None):
    """Albumentations pipeline: optional resize, (training) joint image+mask augmentation, optional random crop.

    ``crop`` = [height, width] of a random window cut last, after the resize and the augmentation.
    """
    import albumentations as A

    steps = [] if image_size is None else [A.Resize(*image_size)]  # masks are resized nearest-neighbour
    if augment:
        steps += [A.HorizontalFlip(p=0.5),
                  A.Affine(scale=(0.8, 1.25), translate_percent=(-0.1, 0.1), rotate=(-5, 5),
                           fill=0, fill_mask=ignore_index, p=0.5),
                  A.RandomBrightnessContrast(0.2, 0.2, p=0.5)]
    if crop is not None:
        steps.append(A.RandomCrop(*crop))
    return A.Compose(steps, seed=seed)


def _reseed_worker(worker_id: int) -> None:
    # Every worker holds a copy of the same seeded pipeline: without this they would all draw the same
    # augmentations. torch's per-worker seed derives from the loader's generator, so runs stay reproducible.
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None)
    if transform is not None:
        transform.set_random_seed(info.seed % 2**32)


class SegmentationFolderDataset(Dataset):
    """(image, mask) files as dicts: ``image`` [3,H,W] float in [0,1], ``mask`` [H,W] long.

    With ``box_classes``, also ``box`` (the pixel box, x1/y1 exclusive, of the largest connected region of
    one of those classes, found after resizing and augmentation) and ``box_label`` (its class;
    ``ignore_index`` with an empty box when the image has none of them).
    """

    def __init__(self, pairs: list[tuple[Path, Path]], num_classes: int, ignore_index: int,
                 transform=None, box_classes: tuple[int, ...] | None = None) -> None:
        self.pairs, self.transform = pairs, transform
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.box_classes = box_classes

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = read_pair(*self.pairs[index], self.num_classes, self.ignore_index)
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255,
                  "mask": torch.from_numpy(np.ascontiguousarray(mask)).long()}
        if self.box_classes:
            box, label = largest_component_box(mask, self.box_classes)
            sample["box"] = torch.from_numpy(box)
            sample["box_label"] = torch.tensor(self.ignore_index if label is None else label)
        return sample


def _check_box_classes(box_classes: list[int] | None, num_classes: int) -> tuple[int, ...] | None:
    if box_classes is None:
        return None
    classes = tuple(int(c) for c in box_classes)
    if not classes or any(not 0 <= c < num_classes for c in classes):
        raise DataError(f"data.box_classes={list(box_classes)} must be a non-empty list of classes in "
                        f"0..{num_classes - 1}", "data.box_classes",
                        "list classes (CamVid: 8 car, 9 pedestrian, 10 bicyclist), or set it to null")
    return classes


def _check_train_crop(train_crop: list[int] | None, image_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if train_crop is None:
        return None
    crop = tuple(int(v) for v in train_crop)
    fits = len(crop) == 2 and min(crop) >= 1 and (
        image_size is None or all(c <= s for c, s in zip(crop, image_size, strict=True)))
    if not fits:
        raise DataError(f"data.train_crop={list(train_crop)} must be [height, width], at most data.image_size="
                        f"{list(image_size) if image_size else None}", "data.train_crop",
                        "give a smaller window, or null to train on whole images")
    return crop


class CamVidDataModule(SplitDataModule):
    """CamVid (or any folder in its layout) for the segmentation task.

    Args:
        root: the data folder; None = ``$DECONVLAB_DATA_DIR/camvid`` or the ``shared/data/camvid``
            beside the checkout (see :func:`default_camvid_root`).
        split: the split that the val/test dataloaders read.
        image_size: [height, width] every image is resized to (e.g. [180, 240] for CPU budgets);
            None keeps 360 x 480. Validation is resized too: metrics are at this resolution.
        augment: flip / affine / brightness-contrast augmentation of the training split.
        train_crop: [height, width] of a random window of every training image (after the resize and the
            augmentation), None = whole images. For models whose output at a pixel sees only a small window
            (the patch classifier's 38x38), a crop keeps every label the loss needs at a fraction of the
            cost of a whole image; validation always reads whole images.
        batch_size, num_workers, seed: the usual.
        num_classes: 11 for CamVid.
        ignore_index: the void label, ignored by loss and metrics (11 for CamVid).
        palette: RGB colour per class; None reads ``camvid11_palette.png`` when the root has it.
        box_classes: classes whose largest connected region gives every sample a ``box`` and
            ``box_label`` (e.g. [8] for cars), for the localisation task and segmenters' box metrics.
    """

    def __init__(self, root: str | None = None, split: str = "val", image_size: tuple[int, int] | None = None,
                 augment: bool = True, batch_size: int = 8, num_workers: int = 0, seed: int = 0,
                 num_classes: int = len(CAMVID_CLASSES), ignore_index: int = CAMVID_VOID,
                 palette: list[list[int]] | None = None, box_classes: list[int] | None = None,
                 train_crop: tuple[int, int] | None = None) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.box_classes = _check_box_classes(box_classes, num_classes)
        self.root = Path(root) if root is not None else default_camvid_root()
        if not self.root.is_dir():
            raise MissingDataError(
                f"CamVid folder {self.root} does not exist", "data.root",
                "set data.root to a folder in the SegNet layout (train/, trainannot/, val/, valannot/), "
                "or use data=shapes")
        self.split, self.augment = split, augment
        self.image_size = tuple(image_size) if image_size is not None else None
        self.train_crop = _check_train_crop(train_crop, self.image_size)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = CAMVID_CLASSES if num_classes == len(CAMVID_CLASSES) else tuple(
            f"class_{i}" for i in range(num_classes))
        self.palette = [list(c) for c in palette] if palette else read_palette(self.root, num_classes)
        self.worker_init_fn = _reseed_worker

    def dataset(self, split: str, augment: bool = False, crop: bool = False) -> SegmentationFolderDataset:
        """The files of ``split``, resized (augmented and cut to ``train_crop`` if asked) like this module's
        loaders do: the training loader asks for both, evaluation for neither."""
        window = self.train_crop if crop else None
        transform = build_transform(self.image_size, augment, self.ignore_index, self.seed, window)
        return SegmentationFolderDataset(self.list_pairs(split), self.num_classes, self.ignore_index,
                                         transform, self.box_classes)

    def list_pairs(self, split: str) -> list[tuple[Path, Path]]:
        """(image, mask) files of ``split`` in this data set's folder layout."""
        return list_pairs(self.root, split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_set = self.dataset("train", augment=self.augment, crop=True)
        self.eval_set = self.dataset(self.split)

    def class_weights(self, split: str = "train") -> torch.Tensor:
        """Median-frequency class weights of ``split`` at full resolution, for a weighted loss."""
        weights = median_frequency_class_weights(str(self.root), split, self.num_classes, self.ignore_index)
        return torch.tensor(weights)

