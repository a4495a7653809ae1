"""The PASCAL VOC layout reader on a small generated VOC folder."""

import numpy as np
import pytest
from PIL import Image

from deconvlab.data.voc import VOCDataModule, list_voc_pairs, voc_palette


def write_voc(root, ids_by_split, size=(40, 48)):
    """A VOC folder: JPEG images, palette PNG masks (a square of class 1 + i, a void border), split lists."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = [c for colour in voc_palette() for c in colour]
    rng = np.random.default_rng(0)
    for split, ids in ids_by_split.items():
        for i, image_id in enumerate(ids):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                root / "JPEGImages" / f"{image_id}.jpg")
            mask = np.zeros(size, np.uint8)
            mask[5:25, 5:25] = 255  # void border
            mask[7:23, 7:23] = 1 + i
            picture = Image.fromarray(mask, mode="P")
            picture.putpalette(palette)
            picture.save(root / "SegmentationClass" / f"{image_id}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_voc_folder_yields_class_indices_with_void(tmp_path):
    root = write_voc(tmp_path / "VOC", {"train": ["a", "b", "c"], "val": ["d", "e"]})
    module = VOCDataModule(root=str(root), image_size=None, augment=False, batch_size=2)
    module.setup("fit")
    batch = next(iter(module.val_dataloader()))
    assert batch["image"].shape == (2, 3, 40, 48) and batch["mask"].shape == (2, 40, 48)
    assert set(batch["mask"].unique().tolist()) == {0, 1, 2, 255}
    assert len(module.train_set) == 3 and module.palette[1] == [128, 0, 0]


def test_voc_errors_name_the_file(tmp_path):
    root = write_voc(tmp_path / "VOC", {"val": ["d"]})
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("d\nmissing\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        list_voc_pairs(root, "val")
    with pytest.raises(FileNotFoundError, match="train.txt"):
        list_voc_pairs(root, "train")
    with pytest.raises(FileNotFoundError, match="data.root"):
        VOCDataModule(root=None)


def test_voc_composes_through_hydra(tmp_path):
    from hydra.utils import instantiate

    from deconvlab.config import compose_config

    root = write_voc(tmp_path / "VOC", {"train": ["a"], "val": ["b"]})
    cfg = compose_config(["data=voc", f"data.root={root}", "model=tiny_encoder_decoder", "task=segmentation"])
    assert cfg.task.num_classes == 21 and cfg.task.ignore_index == 255
    module = instantiate(cfg.data)
    module.setup("validate")
    assert next(iter(module.val_dataloader()))["image"].shape[-2:] == (256, 256)
