"""Every data module stands on SplitDataModule: the same loaders as each built by hand before, one error policy."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import yaml
from hydra.utils import get_class
from torch.utils.data import DataLoader

from conftest import REPO_ROOT
from deconvlab.data.base import SplitDataModule
from deconvlab.data.brats import BratsDataModule
from deconvlab.data.degrade import Degradation, disk_kernel
from deconvlab.data.images import NaturalImagesDataModule
from deconvlab.data.phantom import PhantomDataModule
from deconvlab.data.shapes import ShapesDataModule
from deconvlab.errors import DataError, MissingDataError

DATA_CONFIGS = sorted((REPO_ROOT / "conf" / "data").glob("*.yaml"))


@pytest.mark.parametrize("config", DATA_CONFIGS, ids=[p.stem for p in DATA_CONFIGS])
def test_every_configured_data_module_stands_on_the_one_base(config):
    target = yaml.safe_load(config.read_text())["_target_"]
    assert issubclass(get_class(target), SplitDataModule), f"{config.name}: {target}"


def _batches(loader: DataLoader, epochs: int = 2) -> list[list[dict[str, torch.Tensor]]]:
    return [[dict(batch) for batch in loader] for _ in range(epochs)]


def _same(first: list, second: list) -> bool:
    flat_a, flat_b = sum(first, []), sum(second, [])
    return len(first) == len(second) and len(flat_a) == len(flat_b) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(flat_a, flat_b, strict=True))


def _natural_images(num_workers: int = 0) -> NaturalImagesDataModule:
    return NaturalImagesDataModule(Degradation(disk_kernel(2.0), 0.01), patch_size=16, samples_per_epoch=24,
                                   max_eval_size=24, batch_size=8, num_workers=num_workers, seed=3)


def _phantom(num_workers: int = 0) -> PhantomDataModule:
    return PhantomDataModule(num_train=2, num_eval=1, volume_size=16, patch_size=8, patches_per_epoch=24,
                             batch_size=8, num_workers=num_workers, seed=3)


# What these data modules built by hand before they stood on the base: the training loader shuffles
# from the global RNG, workers restart every epoch (natural images: persist), evaluation images one by one.
# (BraTS has its own training loader since issue 21, fresh centres every epoch: tests/test_brats.py.)
HAND_BUILT = {
    "natural_images": (_natural_images,
                       lambda dm: DataLoader(dm.train_set, batch_size=dm.batch_size, shuffle=True,
                                             num_workers=dm.num_workers, persistent_workers=dm.num_workers > 0),
                       lambda dm: DataLoader(dm.eval_set, batch_size=1, num_workers=0)),
    "phantom": (_phantom,
                lambda dm: DataLoader(dm.train_set, batch_size=dm.batch_size, shuffle=True, num_workers=dm.num_workers),
                lambda dm: DataLoader(dm.eval_set, batch_size=dm.batch_size, num_workers=dm.num_workers)),
}


def _epochs(datamodule: SplitDataModule, train_loader, eval_loader) -> tuple[list, list]:  # noqa: ANN001
    pl.seed_everything(7, verbose=False)  # as train() does: these modules shuffle from the global RNG
    return _batches(train_loader(datamodule)), _batches(eval_loader(datamodule), epochs=1)


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("name", list(HAND_BUILT))
def test_the_base_gives_the_batches_the_hand_built_loaders_gave(name, num_workers):
    if num_workers and name == "natural_images":
        pytest.skip("its persistent worker starts once per loader: covered by the in-process case")
    build, hand_train, hand_eval = HAND_BUILT[name]
    datamodule = build(num_workers)
    datamodule.setup("fit")
    before = _epochs(datamodule, hand_train, hand_eval)
    after = _epochs(datamodule, type(datamodule).train_dataloader, type(datamodule).val_dataloader)
    assert _same(before[0], after[0]) and _same(before[1], after[1])
    assert not _same([before[0][0]], [before[0][1]])  # reshuffled every epoch
    assert datamodule.test_dataloader().batch_size == datamodule.val_dataloader().batch_size


def test_natural_images_evaluate_whole_images_one_by_one_in_process():
    datamodule = _natural_images(num_workers=2)
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    assert loader.batch_size == 1 and loader.num_workers == 0 and not loader.pin_memory
    assert datamodule.train_set is None  # "validate" prepares only the evaluation set


def test_a_loader_before_setup_says_so():
    with pytest.raises(RuntimeError, match=r"PhantomDataModule.setup\(\) must run"):
        _phantom().train_dataloader()


def test_data_modules_raise_one_kind_of_error_per_problem(tmp_path):
    # Something absent: MissingDataError naming data.root.
    with pytest.raises(MissingDataError) as absent:
        BratsDataModule(root=str(tmp_path)).setup("fit")
    assert absent.value.where == "data.root" and "no case folders" in absent.value.what
    with pytest.raises(MissingDataError) as absent:
        NaturalImagesDataModule(Degradation(disk_kernel(2.0)), root=str(tmp_path / "missing")).setup("fit")
    assert absent.value.where == "data.root"
    # A data.* value the data cannot satisfy: DataError naming the key, with a fix.
    unusable = [(lambda: PhantomDataModule(split="train"), "data.split"),
                (lambda: BratsDataModule(root=None, split="holdout").setup("validate"), "data.split"),
                (lambda: NaturalImagesDataModule(Degradation(disk_kernel(2.0)), split="all").setup("validate"),
                 "data.split"),
                (lambda: ShapesDataModule(root=str(tmp_path)), "data.root"),
                (lambda: BratsDataModule(in_channels=3), "data.in_channels")]
    for build, key in unusable:
        with pytest.raises(DataError) as error:
            build()
        assert error.value.where == key and error.value.fix
