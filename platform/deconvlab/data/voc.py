"""PASCAL VOC segmentation layout: ``JPEGImages/``, ``SegmentationClass/`` palette PNGs, split lists.

The class-index PNGs are palette ("P" mode) images whose pixel values are the class indices; 255 marks
the void border around objects, ignored like CamVid's void.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deconvlab.data.camvid import CamVidDataModule
from deconvlab.errors import MissingDataError

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
VOC_VOID = 255


def voc_palette(num_colours: int = 256) -> list[list[int]]:
    """VOC's colour map: the bits of the class index spread over the high bits of R, G and B."""
    colours = np.zeros((num_colours, 3), dtype=int)
    for index in range(num_colours):
        value, shift = index, 7
        while value:
            for channel in range(3):
                colours[index, channel] |= ((value >> channel) & 1) << shift
            value, shift = value >> 3, shift - 1
    return colours.tolist()


def list_voc_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) files listed by ``ImageSets/Segmentation/<split>.txt``; errors name the missing file."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise MissingDataError(f"VOC split {split!r}: no list {listing} (expected <root>/ImageSets/Segmentation/"
                               f"{split}.txt)", "data.root", "set data.root to a VOC folder such as VOCdevkit/VOC2012")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise MissingDataError(f"VOC split {split!r} is empty: {listing} lists no image", str(listing),
                               "list image ids in it, one per line, or choose another data.split")
    pairs = []
    for image_id in ids:
        image, mask = root / "JPEGImages" / f"{image_id}.jpg", root / "SegmentationClass" / f"{image_id}.png"
        for path in (image, mask):
            if not path.is_file():
                raise MissingDataError(f"{listing} lists {image_id!r} but {path} does not exist", str(path),
                                       "add the file or remove the id from the list")
        pairs.append((image, mask))
    return pairs


class VOCDataModule(CamVidDataModule):
    """PASCAL VOC (or any folder in its layout) for the segmentation task.

    Args:
        root: the VOC folder (holding ``JPEGImages``, ``SegmentationClass``, ``ImageSets``); required.
        split: the split list the val/test dataloaders read ("val", "train", or any list file's name).
        image_size: [height, width] every image is resized to; VOC images differ in size, so batches of
            more than one image need it.
        num_classes: 21 for VOC; ignore_index: 255 (the void border).
        **kwargs: as :class:`~deconvlab.data.camvid.CamVidDataModule`.
    """

    def __init__(self, root: str | None = None, split: str = "val",
                 image_size: tuple[int, int] | None = (256, 256), num_classes: int = len(VOC_CLASSES),
                 ignore_index: int = VOC_VOID, palette: list[list[int]] | None = None, **kwargs) -> None:
        if root is None:
            raise MissingDataError("VOC needs a data folder (no VOC data ships with deconvlab)", "data.root",
                                   "set data.root to a folder with JPEGImages/, SegmentationClass/ and "
                                   "ImageSets/Segmentation/")
        super().__init__(root=root, split=split, image_size=image_size, num_classes=num_classes,
                         ignore_index=ignore_index, palette=palette or voc_palette(num_classes), **kwargs)
        self.class_names = VOC_CLASSES if num_classes == len(VOC_CLASSES) else self.class_names

    def list_pairs(self, split: str) -> list[tuple[Path, Path]]:
        return list_voc_pairs(self.root, split)
