"""A synthetic 3-D MRI phantom: a brain with a layered tumour, texture, noise and a bias field.

The fresh-install default and the fast-test data for volumetric segmentation. Labels follow BraTS:
0 background, 1 necrosis, 2 edema, 3 non-enhancing tumour, 4 enhancing tumour. Two channels mimic
FLAIR (edema bright) and T1c (enhancing rim bright), so both modalities are needed to tell the
regions apart.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch.utils.data import Dataset

from deconvlab.data.base import SplitDataModule
from deconvlab.errors import DataError

# Mean intensity of each label in (FLAIR, T1c), before texture, bias and noise.
LABEL_INTENSITIES = {0: (0.0, 0.0), 1: (0.3, -0.6), 2: (1.6, 0.2), 3: (1.0, 0.5), 4: (1.2, 1.8)}
BRAIN_INTENSITY = (0.5, 0.4)
# Case seeds of a split: data seed * 10_000 + this offset. Disjoint ranges, so no case is shared
# between train, val and test.
SPLIT_SEED_OFFSETS = {"train": 0, "val": 5_000, "test": 7_500}


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0


def check_eval_split(split: str) -> str:
    """``split`` when the val/test loaders can read it ("val" or "test"); a DataError naming data.split if not."""
    if split not in ("val", "test"):
        raise DataError(f"phantom split must be 'val' or 'test', got {split!r}", "data.split",
                        "use data.split=val or data.split=test")
    return split


def split_seed(seed: int, split: str) -> int:
    """The seed of the first phantom case of ``split`` ("train", "val" or "test") for data seed ``seed``."""
    if split != "train":
        check_eval_split(split)
    return seed * 10_000 + SPLIT_SEED_OFFSETS[split]


def make_phantom(size: int = 32, seed: int = 0, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """One phantom case.

    Returns:
        ``(image [2, S, S, S] float32, label [S, S, S] uint8)``; the image is z-scored inside the brain.
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"))
    centre = np.full(3, (size - 1) / 2, np.float32)
    brain = _ellipsoid(grid, centre, np.full(3, size * 0.45, np.float32))
    tumour_centre = centre + rng.uniform(-0.15, 0.15, 3) * size
    base = rng.uniform(0.2, 0.28) * size
    label = np.zeros((size,) * 3, np.uint8)
    # Nested shells from the outside in: edema, non-enhancing, enhancing rim, necrotic centre.
    for value, scale in ((2, 1.0), (3, 0.7), (4, 0.5), (1, 0.3)):
        radii = base * scale * rng.uniform(0.8, 1.2, 3)
        label[_ellipsoid(grid, tumour_centre, radii) & brain] = value
    image = np.zeros((2, *label.shape), np.float32)
    for channel in range(2):
        image[channel][brain] = BRAIN_INTENSITY[channel]
        for value, means in LABEL_INTENSITIES.items():
            if value:
                image[channel][label == value] = means[channel]
        texture = gaussian_filter(rng.standard_normal(label.shape), 1.5) * 2.0
        bias = 1.0 + 0.3 * gaussian_filter(rng.standard_normal(label.shape), size / 4) * size / 4
        image[channel] = (image[channel] + 0.3 * texture) * bias + noise * rng.standard_normal(label.shape)
        inside = image[channel][brain]
        image[channel] = np.where(brain, (image[channel] - inside.mean()) / (inside.std() + 1e-6), 0.0)
    return image.astype(np.float32), label


class RandomPatchDataset(Dataset):
    """Random cubic patches, half of them centred on tumour voxels (class balance), seeded by index."""

    def __init__(self, cases: list[tuple[np.ndarray, np.ndarray]], patch_size: int, samples: int,
                 seed: int, tumour_fraction: float = 0.5) -> None:
        self.cases, self.patch_size, self.samples, self.seed = cases, patch_size, samples, seed
        self.tumour_fraction = tumour_fraction
        self.tumour_voxels = [np.argwhere(label > 0) for _, label in cases]

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(self.seed * 1_000_003 + index)
        case = int(rng.integers(len(self.cases)))
        image, label = self.cases[case]
        half, size = self.patch_size // 2, np.array(label.shape)
        if rng.random() < self.tumour_fraction and len(self.tumour_voxels[case]):
            centre = self.tumour_voxels[case][rng.integers(len(self.tumour_voxels[case]))]
        else:
            centre = rng.integers(0, size)
        start = np.clip(centre - half, 0, size - self.patch_size)
        window = tuple(slice(s, s + self.patch_size) for s in start)
        return {"image": torch.from_numpy(image[(slice(None), *window)].copy()),
                "label": torch.from_numpy(label[window].astype(np.int64))}


class TiledPatchDataset(Dataset):
    """Every non-overlapping patch of each case (validation: each voxel counted once)."""

    def __init__(self, cases: list[tuple[np.ndarray, np.ndarray]], patch_size: int) -> None:
        self.items = []
        for image, label in cases:
            starts = [range(0, n - patch_size + 1, patch_size) for n in label.shape]
            for z in starts[0]:
                for y in starts[1]:
                    for x in starts[2]:
                        window = (slice(z, z + patch_size), slice(y, y + patch_size), slice(x, x + patch_size))
                        self.items.append({"image": torch.from_numpy(image[(slice(None), *window)].copy()),
                                           "label": torch.from_numpy(label[window].astype(np.int64))})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class PhantomDataModule(SplitDataModule):
    """Synthetic MRI phantoms as 3-D patches for the volumetric task.

    Patches are shuffled from torch's global RNG (which ``seed_everything`` seeds) and loader workers
    start afresh every epoch, as they always have, so a seed keeps giving the batches it gave before.

    Args:
        root: unused (the phantom needs no files); accepted so every data config has ``data.root``.
        split: "val" or "test" (different seeds).
        num_train, num_eval: number of phantom cases per split.
        volume_size: side of each cubic case.
        patch_size: side of the training/validation patches.
        patches_per_epoch: random training patches per epoch.
        num_classes, in_channels: label values (BraTS: 5) and modalities (2).
    """

    seeded_shuffle = False
    persistent_workers = False

    def __init__(self, root: str | None = None, split: str = "val", num_train: int = 4, num_eval: int = 2,
                 volume_size: int = 32, patch_size: int = 16, patches_per_epoch: int = 64, batch_size: int = 8,
                 num_workers: int = 0, seed: int = 0, num_classes: int = 5, in_channels: int = 2) -> None:
        super().__init__(batch_size, num_workers, seed)
        self.split, self.num_train, self.num_eval = check_eval_split(split), num_train, num_eval
        self.volume_size, self.patch_size, self.patches_per_epoch = volume_size, patch_size, patches_per_epoch
        self.num_classes, self.in_channels = num_classes, in_channels

    def _cases(self, first_seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [make_phantom(self.volume_size, first_seed + i) for i in range(count)]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            cases = self._cases(split_seed(self.seed, "train"), self.num_train)
            self.train_set = RandomPatchDataset(cases, self.patch_size, self.patches_per_epoch, self.seed)
        if self.eval_set is None:
            cases = self._cases(split_seed(self.seed, self.split), self.num_eval)
            self.eval_set = TiledPatchDataset(cases, self.patch_size)
