"""BraTS reader, normalisation, cache, planning and class-balanced voxel-centred sampling (fresh every epoch)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import shared_data, write_phantom_case
from deconvlab.data import brats
from deconvlab.data.brats import (
    BratsDataModule,
    CentredPatchDataset,
    load_case,
    phantom_cases,
    read_case,
)
from deconvlab.data.patches import (
    PatchAugmentation,
    PatchGeometry,
    channel_modalities,
    context_pool,
    extract_patch,
    pad_image,
)
from deconvlab.data.sampling import sample_balanced_centres
from deconvlab.errors import DataError, UserError

AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])
AFFINE[:3, 3] = [90, 120, -70]


def write_case(folder: Path, seed: int = 0, size: int = 20) -> None:
    write_phantom_case(folder, seed, size, AFFINE)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for split, seeds in (("train", (0, 1)), ("validation", (2,))):
        for seed in seeds:
            write_case(tmp_path / split / f"case{seed}", seed)
    return tmp_path


def test_read_case_normalises_inside_the_brain(root):
    case = read_case(root / "train" / "case0", ["flair", "t1c"])
    assert case.image.shape == (2, 20, 20, 20) and case.image.dtype == np.float32
    inside = case.image[:, case.brain]
    np.testing.assert_allclose(inside.mean(axis=1), 0, atol=1e-4)
    np.testing.assert_allclose(inside.std(axis=1), 1, atol=1e-3)
    assert not case.image[:, ~case.brain].any()
    np.testing.assert_array_equal(case.affine, AFFINE)


def test_each_case_is_decoded_once(root, monkeypatch):
    calls = []
    original = brats.read_case
    monkeypatch.setattr(brats, "read_case", lambda *a, **k: calls.append(a) or original(*a, **k))
    monkeypatch.setattr(brats, "_CASE_CACHE", {})
    first = load_case(root / "train" / "case0", ["flair", "t1c"])
    assert load_case(root / "train" / "case0", ["flair", "t1c"]) is first and len(calls) == 1


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "t1c.nii.gz").unlink(), "t1c.nii.gz"),
    (lambda f: nib.save(nib.Nifti1Image(np.zeros((20, 20, 19), np.float32), AFFINE), str(f / "flair.nii.gz")),
     "flair.nii.gz"),
    (lambda f: nib.save(nib.Nifti1Image(np.zeros((20,) * 3, np.float32), np.eye(4)), str(f / "t1c.nii.gz")),
     "t1c.nii.gz"),
    (lambda f: nib.save(nib.Nifti1Image(np.full((20,) * 3, 7, np.uint8), AFFINE),
                        str(f / "otmulticlass.nii.gz")),
     "otmulticlass.nii.gz"),
    (lambda f: nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), str(f / "flair.nii.gz")),
     "flair.nii.gz"),
])
def test_bad_cases_name_the_file(root, damage, message):
    folder = root / "train" / "case0"
    damage(folder)
    with pytest.raises(UserError, match=message):
        read_case(folder, ["flair", "t1c"])


def test_patch_layouts_match_an_independent_cut():
    image = np.random.default_rng(0).standard_normal((2, 30, 31, 32)).astype(np.float32)
    centre = (4, 20, 17)
    geometry = PatchGeometry(3, 5, 3)
    patch = extract_patch(pad_image(image, geometry.margin), centre, geometry)
    assert patch.shape == (4, 5, 5, 5)
    np.testing.assert_array_equal(patch[:2, 2, 2, 2], image[:, 4, 20, 17])
    # Context: the 15^3 region around the centre (zero outside), 3x3x3 average pooling.
    padded = np.pad(image, [(0, 0)] + [(7, 7)] * 3)
    region = torch.from_numpy(padded[:, 4:19, 20:35, 17:32])
    np.testing.assert_allclose(patch[2:], F.avg_pool3d(region[None], 3)[0].numpy(), atol=1e-6)

    flat = PatchGeometry(2, 5, 1, slices=3)
    patch = extract_patch(pad_image(image, flat.margin), centre, flat)
    assert patch.shape == (6, 5, 5)
    np.testing.assert_array_equal(patch[1], image[0, 2:7, 18:23, 17])  # modality 0, centre slice
    np.testing.assert_array_equal(patch[5], image[1, 2:7, 18:23, 18])  # modality 1, slice +1


def test_sampler_follows_the_configured_label_shares():
    cases = phantom_cases(2, 0, 24)
    fractions = [0.4, 0.3, 0.1, 0.1, 0.1]
    centres = sample_balanced_centres(cases, 5000, fractions, seed=0)
    labels = np.array([cases[c].label[z, y, x] for c, z, y, x in centres])
    np.testing.assert_allclose(np.bincount(labels, minlength=5) / len(labels), fractions, atol=0.02)
    background = centres[labels == 0]
    assert all(cases[c].brain[z, y, x] for c, z, y, x in background)  # background is brain, not air


def test_datamodule_plans_writes_the_plan_and_yields_centre_labels(root, tmp_path):
    module = BratsDataModule(root=str(root), patch_size=5, context_factor=3, samples_per_epoch=64,
                             eval_samples=32,
                             batch_size=16, plan_dir=str(tmp_path / "run"))
    module.setup("fit")
    plan = json.loads((tmp_path / "run" / "patch_plan.json").read_text())
    assert plan["cases"] == ["case0", "case1"] and plan["spacing_mm"][0] == [1.0, 1.0, 1.0]
    assert plan["label_fractions"][0] == pytest.approx(0.5)
    assert sum(plan["label_fractions"]) == pytest.approx(1)
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (16, 4, 5, 5, 5) and batch["label"].shape == (16,)
    assert module.in_channels == 4 and len(module.eval_set) == 32
    assert [c.name for c in module.cases("val")] == ["case2"]  # "val" reads the validation/ folder


def test_phantom_default_needs_no_files():
    module = BratsDataModule(root=None, patch_dims=2, patch_size=9, context_factor=1, slices=3,
                             samples_per_epoch=32, eval_samples=16, phantom_cases=1, phantom_size=20)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape[1:] == (6, 9, 9) and module.in_channels == 6
    assert module.plan["label_fractions"][1:] == pytest.approx([0.125] * 4)


@pytest.mark.data
@pytest.mark.slow  # decodes 4 NIfTI volumes (~4 s alone, more on a busy machine)
def test_real_brats_cases_read_and_plan(tmp_path):
    root = shared_data("brats")
    module = BratsDataModule(root=str(root), samples_per_epoch=256, eval_samples=64, plan_dir=str(tmp_path))
    module.setup("fit")
    case = module.train_set.cases[0]
    assert case.image.shape[0] == 2 and case.image.shape[1:] == case.label.shape
    assert set(np.unique(case.label)) <= {0, 1, 2, 3, 4}
    np.testing.assert_allclose(case.image[:, case.brain].mean(axis=1), 0, atol=1e-3)
    labels = np.array([module.train_set[i]["label"].item() for i in range(256)])
    assert 0.35 < (labels > 0).mean() < 0.65  # half the patches centred on tumour
    assert (tmp_path / "patch_plan.json").exists()


@pytest.mark.parametrize("factor", [3, 5])
def test_pooled_context_cut_equals_the_per_patch_average(factor):
    image = np.random.default_rng(1).standard_normal((2, 12, 13, 14)).astype(np.float32)
    geometry = PatchGeometry(3, 5, factor)
    padded = pad_image(image, geometry.margin)
    pooled = context_pool(padded, factor)
    for centre in [(0, 0, 0), (11, 12, 13), (5, 3, 9)]:
        np.testing.assert_allclose(extract_patch(padded, centre, geometry, pooled),
                                   extract_patch(padded, centre, geometry), atol=1e-5)


def test_a_layout_taken_from_the_model_config_builds_no_net_and_leaves_the_seeded_weights_alone(compose):
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from deconvlab.build import build_task

    def initial_weights(*overrides: str) -> tuple[PatchGeometry, list[torch.Tensor]]:
        # The data config's _recursive_: false hands the data module the model's config, not a net.
        cfg = compose("experiment=cascade_deepmedic_p35_phantom", "++data._recursive_=false", *overrides)
        pl.seed_everything(cfg.seed, verbose=False)  # as train() does, before building the data module
        data = instantiate(cfg.data)
        return data.geometry, [p.detach().clone() for p in build_task(cfg).model.parameters()]

    followed, weights = initial_weights()
    explicit, reference = initial_weights("data.layout_of=null", "data.patch_size=35", "data.context_factor=1")
    assert followed == explicit == PatchGeometry(3, 35, 1)
    assert all(torch.equal(a, b) for a, b in zip(weights, reference, strict=True))


def _epoch_batches(module: BratsDataModule, epoch: int) -> list[torch.Tensor]:
    loader = module.train_dataloader()
    loader.sampler.set_epoch(epoch)  # as Lightning does before every training epoch
    return [batch["image"] for batch in loader]


def test_training_centres_are_drawn_afresh_every_epoch_and_the_same_for_the_same_seed(root, tmp_path):
    def module(seed: int) -> BratsDataModule:
        data = BratsDataModule(root=str(root), patch_size=5, context_factor=3, samples_per_epoch=48,
                               eval_samples=8, batch_size=16, seed=seed, plan_dir=str(tmp_path / f"seed{seed}"))
        data.setup("fit")
        return data

    first, again, other = module(0), module(0), module(1)
    epoch0, epoch1 = first.train_set.centres_of(0), first.train_set.centres_of(1)
    assert len(np.unique(np.concatenate([epoch0, epoch1]), axis=0)) > 1.5 * len(np.unique(epoch0, axis=0))
    for epoch in (0, 1):  # the same seed: the same centres and batches, epoch by epoch
        np.testing.assert_array_equal(again.train_set.centres_of(epoch), first.train_set.centres_of(epoch))
        assert all(torch.equal(a, b) for a, b in zip(_epoch_batches(first, epoch), _epoch_batches(again, epoch),
                                                     strict=True))
    assert not torch.equal(_epoch_batches(first, 0)[0], _epoch_batches(first, 1)[0])
    assert not np.array_equal(other.train_set.centres_of(0), epoch0)
    # Every epoch stays class-balanced, and the plan says how the centres are drawn.
    labels = np.array([first.train_set.cases[c].label[z, y, x] for c, z, y, x in epoch1])
    assert 0.3 < (labels > 0).mean() < 0.7
    sampling = json.loads((tmp_path / "seed0" / "patch_plan.json").read_text())["sampling"]
    assert sampling["train_rng"] == "numpy.random.default_rng([0, epoch])" and sampling["natural_from_epoch"] is None


def test_a_lightning_fit_sees_new_patches_every_epoch(root):
    import pytorch_lightning as pl

    from deconvlab.models.mri import DualPathwayCNN3d
    from deconvlab.tasks.volumetric import VolumetricSegmentationTask

    class Seen(pl.Callback):
        def __init__(self) -> None:
            self.batches: dict[int, list[torch.Tensor]] = {}

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batches.setdefault(trainer.current_epoch, []).append(batch["image"].clone())

    data = BratsDataModule(root=str(root), patch_size=5, context_factor=3, samples_per_epoch=32, eval_samples=8,
                           batch_size=16)
    torch.manual_seed(0)
    task = VolumetricSegmentationTask(DualPathwayCNN3d(2, 5, widths=[4, 4], fc_width=8), num_classes=5,
                                      volume_eval="never")
    seen = Seen()
    pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, callbacks=[seen]).fit(task, datamodule=data)
    assert len(seen.batches[0]) == len(seen.batches[1]) == 2
    assert not any(torch.equal(a, b) for a, b in zip(seen.batches[0], seen.batches[1], strict=True))
    np.testing.assert_array_equal(torch.cat(seen.batches[1]).numpy(), torch.cat(_epoch_batches(data, 1)).numpy())


@pytest.mark.parametrize("geometry", [PatchGeometry(3, 5, 3), PatchGeometry(2, 5, 1, slices=3),
                                      PatchGeometry(3, 5, 1, label_size=3)], ids=["context", "2.5-D", "segment"])
def test_a_reflected_patch_is_the_patch_of_the_reflected_volume(geometry):
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 12, 13, 14)).astype(np.float32)
    label = rng.integers(0, 5, (12, 13, 14)).astype(np.uint8)
    case = brats.Case("c", image, label, np.ones(label.shape, bool), np.eye(4))
    mirror = brats.Case("m", np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(label[::-1]),
                        case.brain, np.eye(4))
    centres = np.array([[0, z, 6, 7] for z in range(12)] * 2)
    augment = PatchAugmentation(tuple(channel_modalities(geometry, 2).tolist()), seed=3, flip=True)
    augmented = CentredPatchDataset([case], centres, geometry, augment)
    plain, mirrored = CentredPatchDataset([case], centres, geometry), CentredPatchDataset([mirror], centres, geometry)
    flipped = 0
    for i, (_, z, y, x) in enumerate(centres):
        item = augmented[(1, i)]
        j = next(k for k, c in enumerate(centres) if tuple(c) == (0, 11 - z, y, x))
        reflected = mirrored[j]
        # allclose: the mirrored volume's context averages add the same voxels in another order.
        as_cut = torch.equal(item["image"], plain[i]["image"])
        if torch.allclose(item["image"], reflected["image"], atol=1e-6) and not as_cut:
            assert torch.equal(item["label"], reflected["label"])
            flipped += 1
        else:  # not reflected: the patch as cut
            assert as_cut and torch.equal(item["label"], plain[i]["label"])
        assert torch.equal(item["image"], augmented[(1, i)]["image"])  # the same draw for the same key
    assert 4 <= flipped <= 20


def test_intensity_augmentation_scales_and_shifts_each_modality_alike_in_every_channel():
    geometry = PatchGeometry(3, 5, 3)  # channels: flair, t1c (patch), flair, t1c (context)
    image = np.random.default_rng(1).standard_normal((2, 12, 12, 12)).astype(np.float32)
    case = brats.Case("c", image, np.zeros((12, 12, 12), np.uint8), np.ones((12, 12, 12), bool), np.eye(4))
    centres = np.array([[0, 6, 6, 6]])
    augment = PatchAugmentation(tuple(channel_modalities(geometry, 2).tolist()), flip=False, scale_std=0.2,
                                shift_std=0.3)
    before = CentredPatchDataset([case], centres, geometry)[0]["image"].numpy()
    fits = []
    for epoch in (0, 1):
        after = CentredPatchDataset([case], centres, geometry, augment)[(epoch, 0)]["image"].numpy()
        fit = [np.polyfit(before[c].ravel(), after[c].ravel(), 1) for c in range(4)]  # (scale, shift)
        np.testing.assert_allclose(fit[0], fit[2], atol=1e-4)  # flair: patch and context alike
        np.testing.assert_allclose(fit[1], fit[3], atol=1e-4)
        assert np.abs(fit[0] - fit[1]).max() > 1e-3  # modalities drawn apart
        fits.append(fit[0])
    assert np.abs(fits[0] - fits[1]).max() > 1e-3  # and afresh every epoch


def test_only_training_patches_are_augmented_and_the_plan_says_how(root, tmp_path):
    def module(augment):
        data = BratsDataModule(root=str(root), patch_size=5, context_factor=3, samples_per_epoch=16, eval_samples=8,
                               batch_size=16, plan_dir=str(tmp_path), augment=augment)
        data.setup("fit")
        return data

    plain, augmented = module(None), module({"flip": True, "scale_std": 0.1, "shift_std": 0.1})
    assert not torch.equal(_epoch_batches(plain, 0)[0], _epoch_batches(augmented, 0)[0])
    assert torch.equal(plain.eval_set[0]["image"], augmented.eval_set[0]["image"])
    plan = json.loads((tmp_path / "patch_plan.json").read_text())
    assert plan["augmentation"]["scale_std"] == 0.1 and plan["augmentation"]["flip_axis0"] is True
    with pytest.raises(DataError, match="rotate"):
        module({"rotate": True})
