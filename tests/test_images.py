"""Natural-image data: reproducible degraded crops, augmentation, folders of images and splits."""

import numpy as np
import pytest
import torch

from conftest import shared_data
from deconvlab.data.degrade import Degradation, disk_kernel
from deconvlab.data.images import BlurredCropDataset, NaturalImagesDataModule, list_image_files


def _dataset(augment: bool, seed: int = 0) -> BlurredCropDataset:
    images = [torch.rand(1, 100, 120, generator=torch.Generator().manual_seed(1))]
    return BlurredCropDataset(images, Degradation(disk_kernel(3.0), 0.01), 48, 16, seed, augment=augment)


def test_crops_are_reproducible_by_seed_and_augmented():
    plain, augmented = _dataset(False), _dataset(True)
    assert torch.equal(augmented[5]["input"], _dataset(True)[5]["input"])
    assert not torch.equal(_dataset(True, seed=1)[5]["input"], augmented[5]["input"])
    changed = [not torch.equal(plain[i]["target"], augmented[i]["target"]) for i in range(16)]
    assert any(changed) and not all(changed)  # flips/rotations happen with probability < 1
    assert augmented[0]["input"].shape == augmented[0]["target"].shape == (1, 48, 48)


def test_degraded_crop_matches_blurring_the_whole_image():
    # The margin around a crop makes it equal to the same window of the whole blurred image.
    image = torch.rand(1, 80, 80, generator=torch.Generator().manual_seed(2))
    degradation = Degradation(disk_kernel(3.0), 0.0)
    dataset = BlurredCropDataset([image], degradation, 32, 8, 0)
    whole = degradation(image)
    sample = dataset[0]
    target = sample["target"][0]
    matches = (image[0].unfold(0, 32, 1).unfold(1, 32, 1) == target).flatten(2).all(-1).nonzero()
    (top, left), = matches.tolist()
    assert torch.allclose(sample["input"], whole[..., top:top + 32, left:left + 32], atol=1e-6)


def test_flat_folder_is_split_and_subfolders_win(tmp_path):
    from skimage.io import imsave

    for i in range(10):
        imsave(tmp_path / f"im{i}.png", (np.random.default_rng(i).random((40, 40)) * 255).astype(np.uint8))
    train, val = list_image_files(tmp_path, "train"), list_image_files(tmp_path, "val")
    assert len(train) == 8 and len(val) == 2 and not set(train) & set(val)
    assert len(list_image_files(tmp_path, "test")) == 10
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_image_files(tmp_path / "missing", "val")


def test_extra_training_folders_add_training_images_only(tmp_path):
    from skimage.io import imsave

    from deconvlab.errors import MissingDataError

    for folder, count in (("main", 10), ("extra", 3)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            pixels = np.random.default_rng(i).random((40, 40, 3 if folder == "extra" else 1)).squeeze()
            imsave(tmp_path / folder / f"im{i}.png", (pixels * 255).astype(np.uint8))
    degradation = Degradation(disk_kernel(2.0), 0.01)
    module = NaturalImagesDataModule(degradation, root=str(tmp_path / "main"), patch_size=16,
                                     extra_train_roots=[str(tmp_path / "extra")])
    module.setup("fit")
    assert len(module.train_set.sharp) == 8 + 3 and len(module.eval_set) == 2
    assert all(image.shape[0] == 1 for image in module.train_set.sharp)  # RGB extras read as grayscale
    missing = NaturalImagesDataModule(degradation, root=str(tmp_path / "main"), patch_size=16,
                                      extra_train_roots=[str(tmp_path / "nowhere")])
    with pytest.raises(MissingDataError, match="nowhere") as error:
        missing.setup("fit")
    assert error.value.where == "data.extra_train_roots"


@pytest.mark.data
def test_bsd68_folder_loads_as_grayscale():
    root = shared_data("deblur", "BSD68")
    module = NaturalImagesDataModule(Degradation(disk_kernel(7.0), 0.01), root=str(root), max_eval_size=64)
    module.setup("validate")
    batch = next(iter(module.val_dataloader()))
    assert batch["input"].shape == (1, 1, 64, 64) and 0 <= batch["target"].min() <= batch["target"].max() <= 1
