"""The synthetic shapes set: deterministic by seed, any size, valid labels and largest-object boxes."""

import numpy as np
import pytest
import torch

from deconvlab.data.shapes import (
    SHAPE_CLASSES,
    ShapesConfig,
    ShapesDataModule,
    make_shapes_sample,
)


def test_a_sample_is_a_pure_function_of_seed_split_and_index():
    a, b = make_shapes_sample(3, "train", 7), make_shapes_sample(3, "train", 7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.box, b.box) and a.box_label == b.box_label
    for other in (make_shapes_sample(4, "train", 7), make_shapes_sample(3, "val", 7),
                  make_shapes_sample(3, "train", 8)):
        assert not np.array_equal(a.image, other.image)


@pytest.mark.parametrize("size", [(17, 23), (64, 64), (180, 240)])
def test_any_size_gives_images_in_range_and_labels_in_the_classes(size):
    config = ShapesConfig(*size)
    for index in range(5):
        sample = make_shapes_sample(0, "val", index, config)
        assert sample.image.shape == (*size, 3) and sample.image.dtype == np.float32
        assert 0 <= sample.image.min() and sample.image.max() <= 1
        assert sample.mask.shape == size and sample.mask.max() < len(SHAPE_CLASSES)


def test_every_shape_class_occurs_and_objects_cover_a_sensible_share():
    masks = np.stack([make_shapes_sample(0, "train", i).mask for i in range(60)])
    shares = np.bincount(masks.ravel(), minlength=4) / masks.size
    assert (shares[1:] > 0.01).all() and 0.5 < shares[0] < 0.97


def test_colour_does_not_give_the_class_away():
    # The same class gets many different colours: a net must use the outline.
    colours = []
    for i in range(40):
        sample = make_shapes_sample(0, "train", i, ShapesConfig(noise=0.0))
        if (sample.mask == 2).any():
            colours.append(sample.image[sample.mask == 2].mean(axis=0))
    assert np.std(colours, axis=0).min() > 0.15


def _box_of(pixels: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(pixels)
    return np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)


def test_with_one_object_the_box_is_the_bounding_box_of_the_mask():
    config = ShapesConfig(48, 56, min_objects=1, max_objects=1)
    for index in range(10):
        sample = make_shapes_sample(1, "train", index, config)
        assert np.array_equal(sample.box, _box_of(sample.mask > 0))
        assert sample.box_label == int(sample.mask.max())


def test_the_box_encloses_the_largest_object_of_its_class():
    config = ShapesConfig(64, 64, min_objects=3, max_objects=3)
    for index in range(10):
        sample = make_shapes_sample(2, "train", index, config)
        x0, y0, x1, y1 = sample.box.astype(int)
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        inside = sample.mask[y0:y1, x0:x1] == sample.box_label
        # The object touches all four sides of its box.
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()


def test_datamodule_batches_follow_the_segmentation_contract():
    dm = ShapesDataModule(height=40, width=48, num_train=8, num_val=4, batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 40, 48) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 40, 48) and batch["mask"].dtype == torch.long
    assert batch["box"].shape == (4, 4) and batch["box_label"].shape == (4,)
    first, second = next(iter(dm.val_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(first["image"], second["image"])  # evaluation data never changes


def test_datamodule_rejects_a_root_and_a_wrong_class_count():
    with pytest.raises(ValueError, match="generated"):
        ShapesDataModule(root="/some/folder")
    with pytest.raises(ValueError, match="num_classes must be 4"):
        ShapesDataModule(num_classes=11)
    with pytest.raises(ValueError, match="split"):
        ShapesDataModule(split="holdout").setup()
