"""CamVid data module: the SegNet layout, joint augmentation, class balancing and errors that name the file.

Most tests run on small folders generated in the same layout (synthetic shapes written as files); the
ones marked ``data`` read the real CamVid copy in ../shared/data and skip when it is absent.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_data
from deconvlab.data.camvid import (
    CAMVID_PALETTE,
    CamVidDataModule,
    SegmentationFolderDataset,
    build_transform,
    list_pairs,
    median_frequency_class_weights,
    median_frequency_weights,
)
from deconvlab.data.shapes import ShapesConfig, make_shapes_sample, write_shapes_folder

SIZE = ShapesConfig(36, 44)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_shapes_folder(tmp_path / "camvid_like", {"train": 6, "val": 3}, seed=5, config=SIZE)


def _module(root: Path, **kwargs) -> CamVidDataModule:
    kwargs = {"num_classes": 4, "batch_size": 2, "augment": False, **kwargs}
    return CamVidDataModule(root=str(root), **kwargs)


def test_reads_the_segnet_layout_exactly(folder):
    dm = _module(folder)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and len(dm.eval_set) == 3
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 36, 44) and batch["image"].dtype == torch.float32
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    expected = np.stack([make_shapes_sample(5, "val", i, SIZE).mask for i in range(2)])
    assert torch.equal(batch["mask"], torch.from_numpy(expected).long())  # PNG labels are lossless


def test_resize_option_resizes_images_and_masks_with_nearest_labels(folder):
    dm = _module(folder, image_size=[18, 30])
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (2, 3, 18, 30) and batch["mask"].shape == (2, 18, 30)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3}  # no blended label values


def test_train_crop_cuts_one_window_of_image_and_mask_for_training_only(folder):
    dm = _module(folder, train_crop=[20, 24], split="train")
    dm.setup("fit")
    train, val = next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))
    assert train["image"].shape == (2, 3, 20, 24) and train["mask"].shape == (2, 20, 24)
    assert val["image"].shape == (2, 3, 36, 44)  # evaluation reads whole images, of the train split too
    # Without augmentation the crop is a window of the stored pair: find it in the full image, and the
    # mask must be the same window of the full mask.
    crop = dm.train_set[0]
    whole = SegmentationFolderDataset(list_pairs(folder, "train"), 4, 11)[0]
    windows = whole["image"].unfold(1, 20, 1).unfold(2, 24, 1)  # [3, 17, 21, 20, 24]
    match = (windows - crop["image"][:, None, None]).abs().amax(dim=(0, 3, 4)) == 0
    (y, x), = match.nonzero().tolist()
    assert torch.equal(crop["mask"], whole["mask"][y:y + 20, x:x + 24])
    for bad in ([20, 40], [20], [0, 10]):
        with pytest.raises(ValueError, match="data.train_crop"):
            _module(folder, image_size=[18, 30], train_crop=bad)


def test_augmentation_moves_image_and_mask_together(tmp_path):
    # Colour-coded images: every pixel's colour says its label, so after flips and affine warps the
    # image must still agree with the mask wherever the mask is not void.
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    (tmp_path / "train").mkdir(), (tmp_path / "trainannot").mkdir()
    mask = make_shapes_sample(0, "train", 0, ShapesConfig(64, 80, 3, 3)).mask
    Image.fromarray(colours[mask]).save(tmp_path / "train" / "a.png")
    Image.fromarray(mask).save(tmp_path / "trainannot" / "a.png")
    dataset = SegmentationFolderDataset(list_pairs(tmp_path, "train"), 4, 11,
                                        build_transform(None, augment=True, ignore_index=11, seed=1))
    changed = 0
    for _ in range(12):
        item = dataset[0]
        image = (item["image"].permute(1, 2, 0).numpy() * 255).astype(int)
        decoded = np.abs(image[:, :, None, :] - colours[None, None].astype(int)).sum(-1).argmin(-1)
        valid = item["mask"].numpy() != 11
        assert (decoded[valid] == item["mask"].numpy()[valid]).mean() > 0.97
        changed += not np.array_equal(item["mask"].numpy(), mask)
    assert changed >= 3  # the augmentation does change the samples


def test_median_frequency_weights_by_hand():
    masks = [np.array([[0, 0, 0, 1]]), np.array([[0, 2, 2, 11]])]
    # freq: class 0 = 4/7 pixels, class 1 = 1/4 (only image 1), class 2 = 2/3 (only image 2, void ignored)
    freq = np.array([4 / 7, 1 / 4, 2 / 3])
    expected = np.median(freq) / freq
    torch.testing.assert_close(median_frequency_weights(masks, 4, 11),
                               torch.tensor([*expected, 0.0], dtype=torch.float32))


def test_class_weights_of_a_folder(folder):
    weights = median_frequency_class_weights(str(folder), "train", num_classes=4, ignore_index=11)
    assert isinstance(weights, list) and len(weights) == 4
    assert weights[0] < min(weights[1:])  # the background is the frequent class: the lowest weight
    torch.testing.assert_close(_module(folder).class_weights(), torch.tensor(weights))


def test_palette_is_read_from_the_root_when_present(folder):
    assert _module(folder, num_classes=11).palette == [list(c) for c in CAMVID_PALETTE]
    strip = np.array([[[10, 20, 30, 255], [40, 50, 60, 255], [70, 80, 90, 255], [1, 2, 3, 255]]], np.uint8)
    Image.fromarray(strip).save(folder / "camvid11_palette.png")
    assert _module(folder).palette == [[10, 20, 30], [40, 50, 60], [70, 80, 90], [1, 2, 3]]


def _first(folder: Path, split: str = "val") -> tuple[Path, Path]:
    image = sorted((folder / split).iterdir())[0]
    return image, folder / f"{split}annot" / f"{image.stem}.png"


def _load_all(folder: Path, split: str = "val", **kwargs) -> None:
    dm = _module(folder, **kwargs)
    dm.setup("validate")
    list(dm.val_dataloader())


def test_mask_and_image_of_different_sizes_name_the_file(folder):
    image, mask = _first(folder)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask)
    with pytest.raises(ValueError, match=f"{mask.name}.*is 12x10 but image .*{image.name}"):
        _load_all(folder)


def test_labels_outside_the_classes_name_the_file_but_void_is_fine(folder):
    image, mask = _first(folder)
    labels = np.zeros((36, 44), np.uint8)
    labels[0, 0] = 11  # void: allowed
    Image.fromarray(labels).save(mask)
    _load_all(folder)
    labels[1, 1] = 7
    Image.fromarray(labels).save(mask)
    with pytest.raises(ValueError, match=rf"{mask.name} has values \[7\] outside the classes 0..3"):
        _load_all(folder)


def test_unreadable_image_names_the_file(folder):
    image, _ = _first(folder)
    image.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=f"cannot read .*{image.name}"):
        _load_all(folder)


def test_empty_split_missing_mask_and_missing_root_are_clear(folder, tmp_path):
    (folder / "test").mkdir()
    with pytest.raises(FileNotFoundError, match="split 'test' is empty"):
        _module(folder, split="test").setup("validate")
    with pytest.raises(FileNotFoundError, match="no folder .*holdout"):
        _module(folder, split="holdout").setup("validate")
    image, mask = _first(folder)
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=f"{image.name} has no label file"):
        _module(folder).setup("validate")
    with pytest.raises(FileNotFoundError, match="data.root"):
        CamVidDataModule(root=str(tmp_path / "nowhere"))


@pytest.mark.data
def test_real_camvid_at_the_cpu_budget():
    root = shared_data("camvid")
    dm = CamVidDataModule(root=str(root), image_size=[180, 240], batch_size=4)
    dm.setup("fit")
    assert len(dm.train_set) == 367 and len(dm.eval_set) == 101
    assert dm.palette == [list(c) for c in CAMVID_PALETTE]  # read from camvid11_palette.png
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 180, 240) and batch["mask"].shape == (4, 180, 240)
    labels = set(batch["mask"].unique().tolist())
    assert labels <= set(range(12)) and len(labels) > 4


def test_median_frequency_balancing_plugs_into_the_task_config(folder, compose):
    from deconvlab.build import build_task

    cfg = compose("experiment=fcn8s_camvid", f"data.root={folder}", "data.num_classes=4",
                  "task.class_weights={_target_:deconvlab.data.camvid.median_frequency_class_weights,"
                  "root:${data.root},num_classes:${data.num_classes},ignore_index:${data.ignore_index}}",
                  "model.width=0.0625")
    task = build_task(cfg)
    expected = median_frequency_class_weights(str(folder), num_classes=4, ignore_index=11)
    torch.testing.assert_close(task.class_weights, torch.tensor(expected))
