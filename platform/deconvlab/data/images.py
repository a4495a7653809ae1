"""Natural images for deblurring: skimage.data by default, or any folder of PNG/JPEG files.

Training samples are random crops degraded on the fly; validation uses whole (centre-cropped) images
degraded once. A training crop is degraded with a margin of half the kernel around it that is cut off
afterwards, so crops carry real image content at their borders, not padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deconvlab.data.base import SplitDataModule
from deconvlab.data.degrade import Degradation
from deconvlab.errors import DataError, MissingDataError, first_line

# Images that ship inside scikit-image (no download). chelsea and cat are the same photo: only one is used.
SKIMAGE_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel",
              "hubble_deep_field", "immunohistochemistry", "retina", "text"),
    "val": ("camera", "coins"),
    "test": ("moon", "page"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _to_gray_float(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2gray, rgba2rgb
    from skimage.util import img_as_float32

    if image.ndim == 3 and image.shape[-1] == 4:
        image = rgba2rgb(image)
    if image.ndim == 3:
        image = rgb2gray(image)
    return img_as_float32(image)


def skimage_split(split: str) -> tuple[str, ...]:
    """The names of the scikit-image images in ``split`` ("train", "val" or "test")."""
    if split not in SKIMAGE_SPLITS:
        raise DataError(f"the scikit-image images have no split {split!r}", "data.split",
                        f"use one of {', '.join(SKIMAGE_SPLITS)}, or set data.root to a folder of images")
    return SKIMAGE_SPLITS[split]


def load_skimage_images(names: Sequence[str]) -> list[np.ndarray]:
    """Grayscale float32 images in [0, 1] from ``skimage.data`` by name."""
    import skimage.data

    return [_to_gray_float(getattr(skimage.data, name)()) for name in names]


def list_image_files(root: Path, split: str, val_fraction: float = 0.2) -> list[Path]:
    """The image files of ``split`` under ``root``.

    ``root/<split>/`` is used when it exists. Otherwise the images directly under ``root`` are split
    deterministically (every 1/val_fraction-th file, sorted by name, goes to "val"); "test" and "all"
    take every image.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingDataError(f"image folder {root} does not exist", "data.root",
                               "point data.root at a folder of images, or null for scikit-image's")
    folder = root / split if (root / split).is_dir() else root
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if folder == root and split in ("train", "val"):
        stride = max(2, round(1 / val_fraction))
        files = [f for i, f in enumerate(files) if (i % stride == 0) == (split == "val")]
    if not files:
        raise MissingDataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) for split {split!r} under {folder}",
                               "data.root", f"put images in {root}/{split}/ or directly in {root}")
    return files


def load_image_files(files: Sequence[Path]) -> list[np.ndarray]:
    """Grayscale float32 images in [0, 1] read from disk."""
    return [_to_gray_float(read_image_file(f)) for f in files]


def read_image_file(path: Path) -> np.ndarray:
    """One image file as an array; a DataError naming the file if it cannot be decoded."""
    from skimage.io import imread

    try:
        return imread(str(path))
    except Exception as error:  # noqa: BLE001 - imageio/PIL raise OSError, SyntaxError, struct.error...
        raise DataError(f"cannot read image {Path(path).name}: {first_line(error)}", str(path),
                        "replace or remove the damaged file") from error


def dihedral_augmentation(rotate: bool = True):
    """Flips and 90-degree rotations (albumentations), applied to the sharp crop before it is degraded,
    so the degradation itself is never augmented."""
    import albumentations as A

    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    return A.Compose(flips + ([A.RandomRotate90(p=0.5)] if rotate else []))


class BlurredCropDataset(Dataset):
    """Random crops degraded on the fly; each sample is reproducible from (seed, index)."""

    def __init__(self, sharp: list[torch.Tensor], degradation: Degradation, patch_size: int,
                 samples: int, seed: int, augment: bool = False) -> None:
        small = [tuple(s.shape[-2:]) for s in sharp if min(s.shape[-2:]) < patch_size]
        if small:
            raise DataError(f"patch_size {patch_size} is larger than images of size {small}", "data.patch_size",
                            "lower data.patch_size or use larger images")
        self.sharp, self.degradation = sharp, degradation
        self.patch_size, self.samples, self.seed = patch_size, samples, seed
        self.margin = max(degradation.kernel.shape) // 2
        self.augment = dihedral_augmentation() if augment else None
        self.flips = dihedral_augmentation(rotate=False) if augment else None

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        i = int(torch.randint(len(self.sharp), (1,), generator=g))
        h, w = self.sharp[i].shape[-2:]
        top = int(torch.randint(h - self.patch_size + 1, (1,), generator=g))
        left = int(torch.randint(w - self.patch_size + 1, (1,), generator=g))
        m, p = self.margin, self.patch_size
        # The margin is clamped at the image border, where reflect padding takes over.
        y0, x0 = max(top - m, 0), max(left - m, 0)
        region = self.sharp[i][..., y0:min(top + p + m, h), x0:min(left + p + m, w)]
        if self.augment is not None:
            region = self._augmented(region, int(torch.randint(2**31, (1,), generator=g)))
        degraded = self.degradation(region, g)
        window = (..., slice(top - y0, top - y0 + p), slice(left - x0, left - x0 + p))
        return {"input": degraded[window], "target": region[window]}

    def _augmented(self, region: torch.Tensor, seed: int) -> torch.Tensor:
        # A region clipped at the image border is not square: rotating it would change its shape.
        transform = self.augment if region.shape[-1] == region.shape[-2] else self.flips
        transform.set_random_seed(seed)
        image = transform(image=np.ascontiguousarray(region.permute(1, 2, 0).numpy()))["image"]
        image = np.ascontiguousarray(image).reshape(region.shape[1], region.shape[2], -1)
        return torch.from_numpy(image).permute(2, 0, 1)


class WholeImageDataset(Dataset):
    """Whole images degraded once, deterministically (validation and test)."""

    def __init__(self, sharp: list[torch.Tensor], degradation: Degradation, seed: int) -> None:
        self.items = []
        for index, image in enumerate(sharp):
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            self.items.append({"input": degradation(image, g), "target": image})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class NaturalImagesDataModule(SplitDataModule):
    """Blurred/sharp pairs from natural images for the restoration task.

    Training crops are shuffled from torch's global RNG (which ``seed_everything`` seeds), as they always
    have been, so a seed keeps giving the batches it gave before.

    Args:
        degradation: the blur model applied on the fly.
        root: a folder of images (``root/train``, ``root/val``... or a flat folder split 80/20);
            None uses the images that ship inside scikit-image.
        split: the split the validation/test dataloaders read ("val", "test", "all").
        patch_size: side of the square training crops.
        samples_per_epoch: training crops per epoch.
        max_eval_size: centre-crop evaluation images to at most this side (None = whole images).
        batch_size, num_workers, seed: the usual.
        augment: random flips and 90-degree rotations of training crops (albumentations).
        extra_train_roots: more folders of natural images whose every image is a training image (e.g.
            CamVid's training photographs, read as grayscale): a learnt restorer sees more texture than
            one data set's training split holds. Validation and test stay ``root``'s.
    """

    seeded_shuffle = False
    # Evaluation images may differ in size: one per batch. They are degraded once in setup, so a loader
    # process would only copy them.
    eval_batch_size, eval_num_workers = 1, 0

    def __init__(self, degradation: Degradation, root: str | None = None, split: str = "val",
                 patch_size: int = 48, samples_per_epoch: int = 256, max_eval_size: int | None = 256,
                 batch_size: int = 16, num_workers: int = 0, seed: int = 0, augment: bool = True,
                 extra_train_roots: Sequence[str] = ()) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.augment = augment
        self.extra_train_roots = [str(r) for r in extra_train_roots]
        self.degradation = degradation
        self.root, self.split = root, split
        self.patch_size, self.samples_per_epoch = patch_size, samples_per_epoch
        self.max_eval_size = max_eval_size

    def _images(self, split: str) -> list[torch.Tensor]:
        if self.root is None:
            arrays = load_skimage_images(skimage_split(split))
        else:
            arrays = load_image_files(list_image_files(Path(self.root), split))
        return [torch.from_numpy(a)[None] for a in arrays]

    def _extra_training_images(self) -> list[np.ndarray]:
        for root in self.extra_train_roots:
            if not Path(root).is_dir():
                raise MissingDataError(f"extra training image folder {root} does not exist",
                                       "data.extra_train_roots", "list folders of images, or [] for none")
        return [a for root in self.extra_train_roots for a in load_image_files(list_image_files(Path(root), "all"))]

    def _centre_crop(self, image: torch.Tensor) -> torch.Tensor:
        if self.max_eval_size is None:
            return image
        h, w = image.shape[-2:]
        ch, cw = min(h, self.max_eval_size), min(w, self.max_eval_size)
        top, left = (h - ch) // 2, (w - cw) // 2
        return image[..., top:top + ch, left:left + cw]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            extra = [torch.from_numpy(a)[None] for a in self._extra_training_images()]
            self.train_set = BlurredCropDataset(self._images("train") + extra, self.degradation, self.patch_size,
                                                self.samples_per_epoch, self.seed, self.augment)
        if self.eval_set is None:
            eval_images = [self._centre_crop(im) for im in self._images(self.split)]
            self.eval_set = WholeImageDataset(eval_images, self.degradation, self.seed + 1)
