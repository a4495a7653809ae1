"""The metric conventions of docs/metrics.md, each against an independent reference (scikit-image,
scikit-learn, a brute-force count) on random inputs and on an edge case that tells the conventions apart;
per-item rows and the aggregates they give; MACs per labelled output pixel."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
from scipy import ndimage
from torch.utils.data import DataLoader

from deconvlab import cost
from deconvlab.data.brats import BRATS_REGIONS, Case
from deconvlab.data.patches import extract_patch, geometry_of, pad_image
from deconvlab.data.phantom import make_phantom
from deconvlab.macs import count_macs
from deconvlab.models import get_model_spec
from deconvlab.models.mri import DualPathwayCNN3d
from deconvlab.tasks.localisation import LocalisationTask
from deconvlab.tasks.reconstruction import ReconstructionTask
from deconvlab.tasks.restoration import RestorationTask
from deconvlab.tasks.segmentation import SegmentationTask
from deconvlab.tasks.volumetric import VolumetricSegmentationTask
from deconvlab.volume.metrics import diagonal_mm, hausdorff95
from deconvlab.volume.report import stage_metrics, summarise


def _validate(task: pl.LightningModule, data: pl.LightningDataModule | DataLoader) -> dict[str, float]:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    loaders = {"datamodule": data} if isinstance(data, pl.LightningDataModule) else {"dataloaders": data}
    (results,) = trainer.validate(task, verbose=False, **loaders)
    return results


# -- restoration: per-image PSNR / SSIM ------------------------------------------------------------------
def _skimage_scores(output: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    psnr = peak_signal_noise_ratio(target, output, data_range=1.0)
    ssim = structural_similarity(output, target, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    return psnr, ssim


def test_restoration_figures_are_means_of_per_image_scikit_image_scores():
    """Catches: a pooled PSNR under ``val/psnr``, another SSIM window, the crop left out, ``psnr_input`` pooled."""
    rng = np.random.default_rng(0)
    task = RestorationTask(nn.Identity(), crop_border=2)
    task.record_items = True
    expected, crops = [], []
    for count in (3, 2):  # two batches of different sizes
        target = rng.random((count, 3, 24, 28)).astype(np.float32)
        noise = rng.uniform(0.02, 0.3, (count, 1, 1, 1))
        output = np.clip(target + noise * rng.standard_normal(target.shape), 0, 1).astype(np.float32)
        degraded = np.clip(target + 0.2 * rng.standard_normal(target.shape), 0, 1).astype(np.float32)
        batch = {"input": torch.from_numpy(degraded), "target": torch.from_numpy(target)}
        task.update_metrics(torch.from_numpy(output), batch)
        for o, d, t in zip(output, degraded, target, strict=True):
            o, d, t = (a[:, 2:-2, 2:-2].astype(np.float64) for a in (o, d, t))
            expected.append((*_skimage_scores(o, t), _skimage_scores(d, t)[0]))
            crops.append((o, t))
    rows = np.array([[r["val/psnr"], r["val/ssim"], r["val/psnr_input"]] for r in task.item_rows])
    np.testing.assert_allclose(rows, np.array(expected), rtol=1e-6)
    values = task.val_metrics.compute()
    means = np.mean(expected, axis=0)
    assert [float(values[k]) for k in ("psnr", "ssim", "psnr_input")] == pytest.approx(means, rel=1e-5)
    pooled_mse = np.mean([((o - t) ** 2).mean() for o, t in crops])
    assert float(values["psnr_pooled"]) == pytest.approx(10 * np.log10(1 / pooled_mse), rel=1e-5)
    assert [r["item"] for r in task.item_rows] == ["00000", "00001", "00002", "00003", "00004"]


def test_two_images_at_40_and_20_db_average_30_db_where_pooling_gives_23():
    """The issue's edge case: a pooled PSNR would report 22.97 dB as ``val/psnr``."""
    target = torch.full((2, 1, 16, 16), 0.5)
    signs = (torch.arange(16)[:, None] + torch.arange(16)) % 2 * 2 - 1.0  # a checkerboard of +-1
    output = target + torch.stack([0.01 * signs, 0.1 * signs])[:, None]  # MSE 1e-4 (40 dB) and 1e-2 (20 dB)
    task = RestorationTask(nn.Identity())
    task.update_metrics(output, {"input": target, "target": target})
    values = task.val_metrics.compute()
    assert float(values["psnr"]) == pytest.approx(30.0, abs=1e-4)
    assert float(values["psnr_pooled"]) == pytest.approx(10 * math.log10(1 / 0.00505), abs=1e-4)  # 22.97
    assert float(values["psnr_input"]) == pytest.approx(100.0)  # an exact image counts 100 dB, not inf


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, count: int, names: bool = False) -> None:
        g = torch.Generator().manual_seed(0)
        self.targets = torch.rand(count, 1, 16, 16, generator=g)
        self.inputs = (self.targets + 0.2 * torch.randn(count, 1, 16, 16, generator=g)).clamp(0, 1)
        self.names = names

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> dict:
        item = {"input": self.inputs[i], "target": self.targets[i]}
        return item | ({"name": f"img{i}"} if self.names else {})


def test_logged_restoration_figures_are_the_means_of_the_item_rows():
    """Catches: a mean of per-batch means (batches of 3, 3, 1), rows kept across epochs, rows in training."""
    torch.manual_seed(0)
    task = RestorationTask(nn.Conv2d(1, 1, 3, padding=1))
    loader = DataLoader(_Pairs(7), batch_size=3)
    assert not task.record_items  # off by default: training pays nothing
    _validate(task, loader)
    assert task.item_rows == []
    task.record_items = True
    for _ in range(2):  # a second validation starts afresh
        results = _validate(task, loader)
        assert [r["item"] for r in task.item_rows] == [f"{i:05d}" for i in range(7)]
    aggregates = task.item_aggregates()
    assert aggregates == {"val/psnr": "mean", "val/ssim": "mean", "val/psnr_input": "mean"}
    for key in aggregates:
        assert results[key] == pytest.approx(np.mean([r[key] for r in task.item_rows]), rel=1e-5)
    _validate(task, DataLoader(_Pairs(4, names=True), batch_size=3))
    assert [r["item"] for r in task.item_rows] == ["img0", "img1", "img2", "img3"]  # the data's own names


def test_reconstruction_figures_are_means_of_per_image_losses():
    rng = np.random.default_rng(1)
    task = ReconstructionTask(nn.Identity())
    task.record_items = True
    images = rng.random((5, 1, 6, 6)).astype(np.float32)
    outputs = rng.random((5, 1, 6, 6)).astype(np.float32)
    task.update_metrics(torch.from_numpy(outputs), {"image": torch.from_numpy(images)})
    mse = ((outputs - images) ** 2).reshape(5, -1).mean(1)
    assert [r["val/mse"] for r in task.item_rows] == pytest.approx(mse, rel=1e-5)
    assert float(task.val_metrics.compute()["mse"]) == pytest.approx(mse.mean(), rel=1e-5)


# -- segmentation: present-class means -------------------------------------------------------------------
def _sklearn_scores(truth: np.ndarray, predicted: np.ndarray, void: int) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, jaccard_score, recall_score

    keep = truth != void
    t, p = truth[keep], predicted[keep]
    present = np.unique(t)
    return {"miou": jaccard_score(t, p, labels=present, average=None).mean(),
            "class_acc": recall_score(t, p, labels=present, average="macro", zero_division=0),
            "pixel_acc": accuracy_score(t, p)}


def test_segmentation_scores_match_scikit_learn_over_the_present_classes():
    """Class 4 never occurs in the truth but is predicted: it must count neither as 0 nor at all.
    Catches: macro means over all K classes, void pixels scored, per-image rows pooled over the batch."""
    rng = np.random.default_rng(0)
    k, void = 5, 255
    task = SegmentationTask(nn.Identity(), num_classes=k, ignore_index=void)
    task.record_items = True
    truths, predictions = [], []
    for _ in range(2):
        truth = rng.integers(0, 4, (3, 6, 7))
        truth[rng.random(truth.shape) < 0.1] = void
        predicted = np.where(rng.random(truth.shape) < 0.6, truth % void, rng.integers(0, k, truth.shape))
        logits = torch.nn.functional.one_hot(torch.from_numpy(predicted), k).permute(0, 3, 1, 2).float()
        task.update_metrics(logits, {"image": logits, "mask": torch.from_numpy(truth)})
        truths.append(truth)
        predictions.append(predicted)
    truth, predicted = np.concatenate(truths), np.concatenate(predictions)
    values = task.val_metrics.compute()
    expected = _sklearn_scores(truth.ravel(), predicted.ravel(), void)
    assert {name: float(values[name]) for name in expected} == pytest.approx(expected, rel=1e-6)
    for row, t, p in zip(task.item_rows, truth, predicted, strict=True):
        assert {name: row[f"val/{name}"] for name in expected} == pytest.approx(_sklearn_scores(t.ravel(), p.ravel(),
                                                                                                void))
    assert task.item_aggregates() == {"val/pixel_acc": "pooled", "val/class_acc": "pooled", "val/miou": "pooled"}


def test_a_class_absent_from_the_truth_does_not_score_zero():
    """All-perfect answers on classes 0 and 1 of a 3-class task: 1.0 everywhere. torchmetrics' macro
    class accuracy (the old ``val/class_acc``) reports 2/3 here."""
    truth = torch.tensor([[[0, 0, 1], [1, 1, 255]]])
    logits = torch.nn.functional.one_hot(truth.clamp(max=1), 3).permute(0, 3, 1, 2).float()
    task = SegmentationTask(nn.Identity(), num_classes=3, ignore_index=255)
    task.update_metrics(logits, {"image": logits, "mask": truth})
    assert {k: float(v) for k, v in task.val_metrics.compute().items()} == {"pixel_acc": 1.0, "class_acc": 1.0,
                                                                            "miou": 1.0}


def test_localisation_pixel_miou_is_over_the_present_classes():
    """A 4-class localiser whose box is the object exactly: mIoU 1, not 0.5 (classes 2 and 3 never occur)."""
    class FixedOutput(nn.Module):  # class 1, box [0, 0, .5, .5]
        def forward(self, x):
            return torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.5]).expand(x.shape[0], -1)

    task = LocalisationTask(FixedOutput(), num_classes=4, ignore_index=255, background_class=0)
    task.record_items = True
    mask = torch.zeros(2, 4, 4, dtype=torch.long)
    mask[:, :2, :2] = 1
    batch = {"image": torch.zeros(2, 3, 4, 4), "box": torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2]]),
             "box_label": torch.tensor([1, 255]), "mask": mask}
    task.update_metrics(task(batch["image"]), batch)
    values = task.flatten_metrics(task.val_metrics.compute())
    assert float(values["miou"]) == pytest.approx(1.0) and float(values["box_iou"]) == pytest.approx(1.0)
    # The second image has no object of interest: no box score (NaN), left out of the mean.
    assert task.item_rows[0]["val/box_iou"] == 1.0 and math.isnan(task.item_rows[1]["val/box_iou"])
    assert task.item_rows[1]["val/miou"] == 1.0


# -- volumes: per-case means, HD95 in mm, missed regions ---------------------------------------------------
def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Surface = voxels with a 6-neighbour outside the mask (or the array); every pairwise distance."""
    def surface(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    distances = np.linalg.norm(sa[:, None] - sb[None], axis=-1)
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


def test_hausdorff95_matches_a_brute_force_count_on_random_anisotropic_masks():
    """Catches: distances in voxels (spacing dropped or mis-ordered), one direction only, another surface."""
    rng = np.random.default_rng(0)
    spacing = (0.7, 1.3, 2.9)
    for _ in range(5):
        a = ndimage.binary_dilation(rng.random((7, 8, 9)) < 0.05, iterations=1)
        b = ndimage.binary_dilation(rng.random((7, 8, 9)) < 0.05, iterations=1)
        expected = _brute_force_hd95(a, b, spacing)
        assert hausdorff95(a, b, spacing) == pytest.approx(expected)
        assert hausdorff95(a, b, spacing[::-1]) != pytest.approx(expected)  # the axis order matters


def _box(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], value: int) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    label[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = value
    return label


def test_volume_figures_are_per_case_means_and_a_missed_region_is_penalised_and_counted():
    """Case A is scored well; case B's enhancing tumour (label 4) is missed. The old summary dropped B's
    infinite HD95 (so missing a region improved the figure) and pooled nothing per case."""
    shape = (12, 12, 12)
    truth_a = _box(shape, (2, 2, 2), (10, 10, 10), 4)
    predicted_a = _box(shape, (3, 2, 2), (10, 10, 10), 4)
    truth_b = _box(shape, (4, 4, 4), (6, 6, 6), 4)
    predicted_b = _box(shape, (4, 4, 4), (6, 6, 6), 2)  # right place, wrong class: enhancing missed
    spacing_b = (1.0, 1.0, 3.0)
    rows = [{"case": "a", "stage": "raw", **stage_metrics(predicted_a, truth_a, BRATS_REGIONS, (1, 1, 1))},
            {"case": "b", "stage": "raw", **stage_metrics(predicted_b, truth_b, BRATS_REGIONS, spacing_b)}]
    figures = summarise(rows)
    dice_a = 2 * 7 * 64 / (7 * 64 + 8 * 64)
    assert figures["volume_dice_enhancing"] == pytest.approx((dice_a + 0.0) / 2)  # pooled would be ~0.93
    assert figures["volume_dice_whole"] == pytest.approx((dice_a + 1.0) / 2)
    penalty = diagonal_mm(shape, spacing_b)  # sqrt(12^2 + 12^2 + 36^2) mm
    assert rows[1]["hd95_enhancing"] == pytest.approx(penalty) and rows[1]["hd95_missed_enhancing"] == 1.0
    assert figures["volume_hd95_enhancing"] == pytest.approx((rows[0]["hd95_enhancing"] + penalty) / 2)
    assert figures["volume_hd95_missed_enhancing"] == 1 and figures["volume_hd95_missed_whole"] == 0
    assert rows[1]["hd95_core"] == pytest.approx(penalty)  # core {1, 3, 4} missed too


def test_a_cases_spacing_comes_from_its_affine():
    rotation = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.2, 3.0])
    case = Case("c", np.zeros((1, 2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), np.ones((2, 2, 2), bool),
                affine)
    assert case.spacing == pytest.approx((0.9, 1.2, 3.0))


class _Cases(pl.LightningDataModule):
    """Centre-voxel patches of a few cases to validate on; the whole cases in ``eval_set.cases``."""

    def __init__(self, cases: list, net: nn.Module) -> None:
        super().__init__()
        self.eval_set = SimpleNamespace(cases=cases)
        geometry = geometry_of(net, 2)
        self.patches = []
        for case in cases:
            padded = pad_image(case.image, geometry.margin)
            self.patches += [{"image": torch.from_numpy(extract_patch(padded, c, geometry)),
                              "label": torch.tensor(int(case.label[tuple(c)]))}
                             for c in np.argwhere(case.label >= 0)[::97]]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.patches, batch_size=16)


def test_volumetric_rows_are_per_case_and_give_the_logged_figures(tmp_path, monkeypatch):
    """Catches: rows per stage instead of per case, figures that are not the documented aggregate of the
    rows (a mean of the missed counts, a mean over finite HD95 only)."""
    monkeypatch.chdir(tmp_path)
    cases = []
    for seed, spacing in ((1, 1.0), (2, 2.0)):
        image, label = make_phantom(14, seed=seed)
        cases.append(Case(f"phantom{seed}", image, label, np.any(image != 0, axis=0), np.diag([spacing] * 3 + [1])))
    torch.manual_seed(0)
    net = DualPathwayCNN3d(2, 5, widths=[4, 4, 4], context_factor=3, fc_width=8)
    task = VolumetricSegmentationTask(net, num_classes=5, volume_tile=8)
    task.record_items = True
    results = _validate(task, _Cases(cases, net))
    assert [row["item"] for row in task.item_rows] == ["phantom1", "phantom2"]
    aggregates = task.item_aggregates()
    assert aggregates["val/volume_hd95_missed_whole_cleaned"] == "sum"
    assert aggregates["val/volume_dice_core"] == "mean"
    assert set(aggregates) == set(task.item_rows[0]) - {"item"}
    for key, how in aggregates.items():
        values = [row[key] for row in task.item_rows]
        assert results[key] == pytest.approx(np.sum(values) if how == "sum" else np.mean(values), rel=1e-5), key


# -- cost: MACs per labelled output pixel ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["deepmedic", "cascade_deepmedic", "twopath_cnn"])
def test_a_patch_net_costs_its_whole_forward_per_labelled_voxel(name):
    """One forward labels one voxel. Catches dividing by the input patch's voxels (the issue's 4,004
    MACs/voxel for a 2.92M-MAC DeepMedic-like forward)."""
    spec = get_model_spec(name)
    net = spec.build_tiny()
    example = torch.rand(1, *spec.example_shape)
    measured = cost.model_cost(net, example, repeats=1)
    assert measured.pixels == 1 and measured.macs_per_pixel == count_macs(net.eval(), example) > 0
    assert replace(measured, latency_ms=2.0).as_metrics()["cost/latency_us_per_pixel"] == 2000.0


def test_a_dense_net_costs_its_macs_over_its_output_pixels():
    """A valid 3x3 convolution on 16 x 16 labels 14 x 14 pixels (not the input's 256); a localiser labels
    one image."""
    net = nn.Conv2d(1, 4, 3)
    measured = cost.model_cost(net, torch.rand(2, 1, 16, 16), repeats=1)
    assert measured.macs == 14 * 14 * 4 * 9 and measured.pixels == 14 * 14
    assert measured.macs_per_pixel == pytest.approx(4 * 9)
    spec = get_model_spec("tiny_encoder_decoder")
    dense = spec.build_tiny()
    example = torch.rand(1, *spec.example_shape)
    measured = cost.model_cost(dense, example, repeats=1)
    output_pixels = math.prod(dense(example).shape[2:])
    assert measured.macs_per_pixel == pytest.approx(count_macs(dense, example) / output_pixels)
    localiser = get_model_spec("localiser")
    assert cost.model_cost(localiser.build_tiny(), torch.rand(1, *localiser.example_shape), repeats=1).pixels == 1
