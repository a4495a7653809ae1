"""Whole-volume inference: dense equals per-voxel, ensembles average, clean-up, metrics, NIfTI output."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from scipy import ndimage
from torch.utils.data import DataLoader

from deconvlab.data.brats import BRATS_REGIONS
from deconvlab.data.patches import extract_patch, geometry_of, pad_image
from deconvlab.data.phantom import make_phantom
from deconvlab.models.mri import (
    CascadeCNN3d,
    DualPathwayCNN3d,
    PatchNetEnsemble,
    SegmentDeepMedic,
    TwoPathCascade,
    TwoPathCNN,
)
from deconvlab.tasks.volumetric import DEFAULT_CLEAN_UP, VolumetricSegmentationTask
from deconvlab.volume.cleanup import clean_up, hole_fills, mean_field_refine
from deconvlab.volume.dense import dense_probabilities, per_voxel_probabilities
from deconvlab.volume.metrics import hausdorff95, region_metrics
from deconvlab.volume.nifti import save_segmentation
from deconvlab.volume.report import case_rows, contour_overlay, log_table, summarise


@pytest.fixture
def nets() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [DualPathwayCNN3d(2, 5, widths=[4, 4, 4], context_factor=3, fc_width=8).eval(),
            TwoPathCNN(6, 5, local_width=4, global_width=6).eval()]


@pytest.fixture
def multi_nets() -> list[torch.nn.Module]:
    """A cascade and an ensemble of 2-D nets (the other "multiple networks" layouts)."""
    torch.manual_seed(0)
    return [CascadeCNN3d(2, 5, first_widths=[4, 4], second_widths=[4, 4], fc_width=8).eval(),
            PatchNetEnsemble(lambda: TwoPathCNN(6, 5, local_width=4, global_width=6), size=2).eval()]


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 8, 9, 7)).astype(np.float32)


@pytest.fixture
def paper_nets() -> list[torch.nn.Module]:
    """Havaei's three TwoPathCNN cascades (2.5-D) and a residual DeepMedic trained on segments (issue 21)."""
    torch.manual_seed(0)
    cascades = [TwoPathCascade(6, 5, join, first_local_width=2, first_global_width=3, local_width=3,
                               global_width=4) for join in ("input", "local", "output")]
    deepmedic = SegmentDeepMedic(2, 5, widths=[3, 4, 4, 5], residual_at=[3, 4], fc_width=6, segment=3)
    for module in deepmedic.modules():  # non-trivial running statistics: eval BatchNorm is a real map
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return [*(c.eval() for c in cascades), deepmedic.eval()]


def test_dense_inference_equals_per_voxel_patch_classification(nets, multi_nets, volume):
    every_voxel = np.argwhere(np.ones(volume.shape[1:], bool))
    for net in [*nets, *multi_nets]:
        dense = dense_probabilities(net, volume, tile=5)  # tiles that do not divide the volume
        naive = per_voxel_probabilities(net, volume, every_voxel)
        np.testing.assert_allclose(dense.reshape(5, -1).T, naive, atol=1e-5)
        np.testing.assert_array_equal(dense.argmax(0).ravel(), naive.argmax(1))


def test_dense_inference_of_the_paper_nets_equals_per_voxel_patch_classification(paper_nets):
    """Havaei's input, local-pathway and mean-field cascades, and the residual segment-trained DeepMedic:
    every voxel of a small volume, tiles that do not divide it."""
    volume = np.random.default_rng(1).standard_normal((2, 5, 6, 4)).astype(np.float32)
    every_voxel = np.argwhere(np.ones(volume.shape[1:], bool))
    for net in paper_nets:
        dense = dense_probabilities(net, volume, tile=4)
        naive = per_voxel_probabilities(net, volume, every_voxel)
        np.testing.assert_allclose(dense.reshape(5, -1).T, naive, atol=1e-5, err_msg=type(net).__name__)


def test_dense_inference_under_bf16_autocast_returns_float32_probabilities(nets, volume):
    reference = dense_probabilities(nets[0], volume, tile=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = dense_probabilities(nets[0], volume, tile=5)
    assert mixed.dtype == np.float32
    np.testing.assert_allclose(mixed, reference, atol=0.05)  # bf16 keeps ~3 significant digits


def test_ensemble_is_the_mean_of_its_members(nets, volume):
    together = dense_probabilities(nets, volume, tile=8)
    apart = [dense_probabilities(net, volume, tile=8) for net in nets]
    np.testing.assert_allclose(together, np.mean(apart, axis=0), atol=1e-6)
    np.testing.assert_allclose(together.sum(0), 1.0, atol=1e-5)


def test_tiles_outside_the_mask_are_background(nets, volume):
    mask = np.zeros(volume.shape[1:], bool)
    mask[:4, :4, :4] = True
    probabilities = dense_probabilities(nets[0], volume, tile=4, mask=mask)
    assert (probabilities[0, 4:, 4:, 4:] == 1).all()
    unmasked = dense_probabilities(nets[0], volume, tile=4)
    np.testing.assert_allclose(probabilities[:, :4, :4, :4], unmasked[:, :4, :4, :4])


def _tumour() -> np.ndarray:
    label = np.zeros((30, 30, 30), np.uint8)
    grid = np.indices(label.shape)
    radius = np.sqrt(((grid - 15) ** 2).sum(0))
    label[radius <= 9] = 2
    label[radius <= 6] = 4
    label[radius <= 3] = 1
    return label


def test_clean_up_removes_a_planted_blob_and_fills_a_planted_hole():
    truth = _tumour()
    predicted = truth.copy()
    predicted[1:3, 1:3, 1:3] = 4  # isolated false positive far from the tumour
    predicted[14:17, 14:17, 14:17] = 0  # hole inside the necrotic core
    predicted[15, 15, 22] = 0  # a one-voxel hole in the edema
    cleaned = clean_up(predicted, BRATS_REGIONS, smooth_radius=0)  # components and holes only: the truth is back
    assert not cleaned[1:3, 1:3, 1:3].any()
    assert (cleaned[14:17, 14:17, 14:17] == 1).all() and cleaned[15, 15, 22] == 2
    before, after = region_metrics(predicted, truth, BRATS_REGIONS), region_metrics(cleaned, truth, BRATS_REGIONS)
    assert after["dice_whole"] > before["dice_whole"] and after["dice_core"] > before["dice_core"]
    assert after["dice_whole"] == pytest.approx(1.0)
    # With smoothing too: the same, less a few single-voxel tips of the digital sphere the opening trims.
    smoothed = clean_up(predicted, BRATS_REGIONS)
    assert not smoothed[1:3, 1:3, 1:3].any() and (smoothed[14:17, 14:17, 14:17] == 1).all()
    assert region_metrics(smoothed, truth, BRATS_REGIONS)["dice_whole"] > 0.99


def test_clean_up_stays_inside_the_brain_and_keeps_large_second_foci():
    label = np.zeros((20, 20, 40), np.uint8)
    label[5:10, 5:10, 5:10] = 2
    label[5:10, 5:10, 25:29] = 4  # a second focus, 4/5 the size of the first: kept
    brain = np.ones(label.shape, bool)
    brain[:, :, 28:] = False
    cleaned = clean_up(label, BRATS_REGIONS, brain, smooth_radius=0)  # boxes: opening would round their edges
    assert (cleaned[5:10, 5:10, 25:28] == 4).all() and not cleaned[:, :, 28:].any()


def test_hole_filling_follows_the_given_regions():
    # BraTS: the core's holes become necrosis, then the whole tumour's edema; the enhancing rim keeps its
    # holes (they are the necrotic centre).
    assert hole_fills(BRATS_REGIONS) == [((1, 3, 4), 1), ((1, 2, 3, 4), 2)]
    # Another convention: label 2 is the inner region, label 1 surrounds it.
    regions = {"inner": [2], "outer": [1, 2]}
    label = np.zeros((20, 20, 20), np.uint8)
    label[4:16, 4:16, 4:16] = 1
    label[8:12, 8:12, 8:12] = 2
    label[5, 5, 5] = 0  # a one-voxel hole in the outer region
    cleaned = clean_up(label, regions, smooth_radius=0)
    assert cleaned[5, 5, 5] == 1 and (cleaned[8:12, 8:12, 8:12] == 2).all()
    # Read with the BraTS regions, the inner blob is a hole of the core {1, 3, 4} and becomes necrosis.
    assert not (clean_up(label, BRATS_REGIONS, smooth_radius=0)[8:12, 8:12, 8:12] == 2).any()


class _OneCase(pl.LightningDataModule):
    """Centre-voxel patches of one case to validate on; the whole case in ``eval_set.cases``."""

    def __init__(self, case: SimpleNamespace, net: torch.nn.Module, centres: np.ndarray) -> None:
        super().__init__()
        self.eval_set = SimpleNamespace(cases=[case])
        geometry = geometry_of(net, case.image.shape[0])
        padded = pad_image(case.image, geometry.margin)
        self.patches = [{"image": torch.from_numpy(extract_patch(padded, c, geometry)),
                         "label": torch.tensor(int(case.label[tuple(c)]))} for c in centres]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.patches, batch_size=len(self.patches))


def test_a_task_with_its_own_regions_scores_the_whole_volumes_by_them(tmp_path, monkeypatch):
    """Non-BraTS regions (3 classes) reach the per-case rows, their clean-up and the logged means."""
    monkeypatch.chdir(tmp_path)
    image, brats_label = make_phantom(16, seed=1)
    label = np.select([np.isin(brats_label, (1, 3, 4)), brats_label == 2], [1, 2], 0).astype(np.uint8)
    case = SimpleNamespace(name="three", image=image, label=label, brain=np.any(image != 0, axis=0),
                           spacing=(1.0, 1.0, 2.5))
    regions = {"centre": [1], "lesion": [1, 2]}
    torch.manual_seed(0)
    net = DualPathwayCNN3d(2, 3, widths=[4, 4, 4], context_factor=3, fc_width=8)
    task = VolumetricSegmentationTask(net, num_classes=3, regions=regions, volume_tile=8)
    data = _OneCase(case, net, np.argwhere(label > 0)[::50])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (results,) = trainer.validate(task, datamodule=data, verbose=False)
    columns = ["case", "stage", "dice_centre", "sensitivity_centre", "dice_lesion", "sensitivity_lesion",
               "hd95_centre", "hd95_lesion", "hd95_missed_centre", "hd95_missed_lesion", "seconds"]
    assert [list(row) for row in task.volume_rows] == [columns, columns]  # raw, cleaned
    raw = dense_probabilities(net, image, tile=8, mask=case.brain).argmax(0).astype(np.uint8)
    cleaned = clean_up(raw, regions, case.brain, **DEFAULT_CLEAN_UP)
    for row, stage in zip(task.volume_rows, (raw, cleaned), strict=True):
        expected = region_metrics(stage, label, regions)
        assert {k: row[k] for k in expected} == pytest.approx(expected)
        # HD95 in mm with the case's own (anisotropic) spacing: a bug that drops it scores 1 mm voxels.
        lesion = (np.isin(stage, regions["lesion"]), np.isin(label, regions["lesion"]))
        assert row["hd95_lesion"] == pytest.approx(hausdorff95(*lesion, case.spacing))
    assert "val/volume_dice_lesion_cleaned" in results and "val/volume_sensitivity_centre" in results
    assert not [k for k in results if any(brats in k for brats in ("whole", "core", "enhancing"))]


def test_region_metrics_match_a_hand_computation():
    truth = np.array([0, 2, 2, 1, 4, 4, 0, 3])
    predicted = np.array([2, 2, 0, 4, 4, 1, 0, 0])
    metrics = region_metrics(predicted, truth, BRATS_REGIONS)
    # whole {1,2,3,4}: predicted at 0,1,3,4,5; truth at 1,2,3,4,5,7; overlap 1,3,4,5 -> 2*4/(5+6)
    assert metrics["dice_whole"] == pytest.approx(8 / 11)
    assert metrics["sensitivity_whole"] == pytest.approx(4 / 6)
    # core {1,3,4}: predicted 3,4,5; truth 3,4,5,7 -> 2*3/7; enhancing {4}: predicted 3,4; truth 4,5 -> 2*1/4
    assert metrics["dice_core"] == pytest.approx(6 / 7) and metrics["dice_enhancing"] == pytest.approx(0.5)


def test_hausdorff95_pools_both_directions_in_mm_and_penalises_a_missed_region():
    """A hand count that tells the conventions apart (docs/metrics.md: MedPy's pooled hd95, in mm).

    Truth: a 10-voxel line along axis 2 at y=0; prediction: the same line moved to y=3, plus one stray
    voxel at y=9. Thin lines are all surface. With spacing (1, 2, 0.5) mm every line voxel is 6 mm from
    the other line and the stray voxel 18 mm from the truth. Pooled, the 21 distances are 20 x 6 and 18:
    95th percentile (position 19 of 0..20) = 6 mm. The other conventions give other answers: ignoring
    spacing 3; the larger directed 95th percentile (prediction -> truth: 10 x 6 and 18, position 9.5)
    12 mm; the plain Hausdorff distance 18 mm.
    """
    truth, predicted = np.zeros((1, 10, 10), bool), np.zeros((1, 10, 10), bool)
    truth[0, 0, :] = True
    predicted[0, 3, :] = True
    predicted[0, 9, 0] = True
    spacing = (1.0, 2.0, 0.5)
    assert hausdorff95(predicted, truth, spacing) == pytest.approx(6.0)
    assert hausdorff95(predicted, truth, (1, 1, 1)) == pytest.approx(3.0)
    assert hausdorff95(truth, predicted, spacing) == pytest.approx(6.0)  # symmetric
    # One side empty (a missed region, or a spurious one): the volume's diagonal in mm, never inf or 0.
    diagonal = np.sqrt(1 ** 2 + 20 ** 2 + 5 ** 2)
    assert hausdorff95(np.zeros_like(truth), truth, spacing) == pytest.approx(diagonal)
    assert hausdorff95(truth, np.zeros_like(truth), spacing) == pytest.approx(diagonal)
    assert hausdorff95(np.zeros_like(truth), np.zeros_like(truth), spacing) == 0.0
    ball = ndimage.binary_dilation(np.pad(truth, 3), iterations=2)
    assert hausdorff95(ball, ball.copy(), spacing) == 0


def test_saved_segmentation_keeps_the_input_affine(tmp_path):
    affine = np.array([[-1.0, 0, 0, 90], [0, -1.0, 0, 126], [0, 0, 1.0, -72], [0, 0, 0, 1]])
    label = _tumour()
    path = save_segmentation(label, affine, tmp_path / "out" / "seg.nii.gz")
    reloaded = nib.load(str(path))
    np.testing.assert_array_equal(reloaded.affine, affine)
    np.testing.assert_array_equal(np.asarray(reloaded.dataobj), label)


def test_smoothing_removes_a_one_voxel_spur_and_keeps_the_tumour():
    truth = _tumour()
    predicted = truth.copy()
    predicted[18, 15, 24:28] = 2  # a one-voxel-thick spur sticking out of the edema (which ends at z=23 there)
    predicted[15, 7:9, 15] = 0  # a one-voxel-wide pit, two deep, into the edema
    smoothed = clean_up(predicted, BRATS_REGIONS, smooth_radius=1)
    # The closing fills the corner at the spur's root first, so at most its root voxel stays.
    assert not smoothed[18, 15, 25:28].any() and (smoothed[15, 7:9, 15] == 2).all()
    assert (clean_up(predicted, BRATS_REGIONS, smooth_radius=0)[18, 15, 24:28] == 2).all()  # switched off: kept
    # Elsewhere it only trims the single-voxel tips of the digital sphere (its poles).
    assert region_metrics(smoothed, truth, BRATS_REGIONS)["dice_whole"] > 0.99


def test_per_case_rows_score_both_stages_and_overlays_outline_truth_and_prediction():
    truth = _tumour()
    predicted = truth.copy()
    predicted[1:3, 1:3, 1:3] = 2  # a false-positive blob the clean-up removes
    probabilities = np.eye(5, dtype=np.float32)[predicted].transpose(3, 0, 1, 2)
    image = np.zeros((1, *truth.shape), np.float32)
    rows, labels = case_rows("c0", probabilities, truth, None, BRATS_REGIONS, {"smooth_radius": 0}, {"weight": 1.0},
                             image, spacing=(1.0, 1.0, 1.0))
    assert [r["stage"] for r in rows] == ["raw", "cleaned", "crf"]
    assert rows[2]["dice_whole"] > 0.99 and not labels["crf"][1:3, 1:3, 1:3].any()
    assert rows[0]["dice_whole"] == pytest.approx(region_metrics(predicted, truth, BRATS_REGIONS)["dice_whole"])
    assert rows[1]["dice_whole"] == pytest.approx(1.0) and rows[1]["hd95_whole"] == 0.0
    assert summarise(rows)["volume_dice_whole_cleaned"] == pytest.approx(1.0)
    shifted = np.roll(truth, 3, axis=0)
    overlay = contour_overlay(image[0], truth, shifted)
    z = 15  # the slice with most tumour
    truth_outline = (truth[:, :, z] > 0) & ~ndimage.binary_erosion(truth[:, :, z] > 0)
    assert overlay.shape == (30, 30, 3) and (overlay[truth_outline & ~np.roll(truth_outline, 3, 0), 1] == 220).all()
    assert (overlay[np.roll(truth_outline, 3, 0), 0] == 255).all() and not overlay[15, 15].any()


def test_mean_field_refinement_corrects_scattered_errors_but_not_across_an_edge():
    truth = (_tumour() > 0).astype(np.int64)
    image = truth[None].astype(np.float32) * 3.0  # the tumour is bright: an intensity edge at its border
    rng = np.random.default_rng(0)
    flipped = rng.random(truth.shape) < 0.1  # 10 % of voxels wrongly, but weakly, classified
    p_tumour = np.where(truth == 1, 0.8, 0.2)
    p_tumour[flipped] = 1 - p_tumour[flipped]
    probabilities = np.zeros((5, *truth.shape), np.float32)
    probabilities[0], probabilities[2] = 1 - p_tumour, p_tumour
    refined = mean_field_refine(probabilities, image, weight=1.0, sigma=1.0, iterations=3)
    raw_errors = (probabilities.argmax(0) > 0) != truth
    refined_errors = (refined.argmax(0) > 0) != truth
    assert refined_errors.sum() < 0.01 * raw_errors.sum()  # 2,740 wrong voxels -> 0 here
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(mean_field_refine(probabilities, image, weight=0.0), probabilities)
    # Without the intensity edge (a flat image) the smoothing also eats into the tumour's corners.
    flat = mean_field_refine(probabilities, np.zeros_like(image), weight=1.0, iterations=3)
    assert ((flat.argmax(0) > 0) != truth).sum() > refined_errors.sum() + 50


def test_volume_benchmark_trains_and_reloads_a_net_with_its_overrides(tmp_path, monkeypatch):
    """The benchmark's --dice step (smallest form): its Hydra overrides must compose against conf/."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "volume_inference.py"
    spec = importlib.util.spec_from_file_location("volume_inference_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    monkeypatch.chdir(tmp_path)
    net, data, _ = benchmark.train_net("deepmedic_p9_ctx3_phantom", [
        "trainer.max_epochs=1", "data.samples_per_epoch=32", "data.eval_samples=32", "data.batch_size=16",
        "data.phantom_size=20", "data.phantom_cases=1", f"paths.output_dir={tmp_path}/run"])
    assert not net.training and net.patch_size == data.geometry.patch_size
    # The reloaded checkpoint labels a volume.
    probabilities = dense_probabilities(net, data.cases("val")[0].image[:, :6, :6, :6], tile=6)
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)


@pytest.mark.slow  # a fresh MLflow store: ~6 s
def test_logged_volume_table_is_the_csv_of_its_rows(tracking_uri):
    from deconvlab import tracking

    rows = [{"case": "a", "stage": "raw", "dice_whole": 0.123456}, {"case": "b", "stage": "raw", "dice_whole": 1.0}]
    with tracking.tracked_run("volume-table-test", "table", tracking_uri, {}) as (client, run_id):
        log_table(client, run_id, rows, "per_case.csv")
    text = Path(client.download_artifacts(run_id, "volume/per_case.csv")).read_text().splitlines()
    assert text == ["case,stage,dice_whole", "a,raw,0.1235", "b,raw,1.0"]


def test_predict_labels_a_nifti_volume_with_a_patch_net_by_dense_inference(compose, tmp_path):
    from deconvlab.build import build_task
    from deconvlab.model_io import LoadedModel
    from deconvlab.predict import prepare_volumes, segment_volume, zscore_inside

    cfg = compose("experiment=deepmedic_p9_ctx3_phantom")
    torch.manual_seed(0)
    task = build_task(cfg).eval()
    loaded = LoadedModel("runs:/patch-net", cfg, task, "volumetric")
    image, _ = make_phantom(12, seed=3)
    source = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), np.eye(4)), str(source))
    (item,) = prepare_volumes(loaded, [source])
    (written,) = segment_volume(loaded, item, tmp_path)
    # Each brain voxel gets the patch classifier's label for the patch centred on it.
    normalised = zscore_inside(image)
    centres = np.argwhere(np.ones(image.shape[1:], bool))
    expected = per_voxel_probabilities(task.model, normalised, centres).argmax(1).reshape(image.shape[1:])
    brain = np.any(normalised != 0, axis=0)
    labels = np.asarray(nib.load(str(written)).dataobj)
    assert labels.shape == image.shape[1:] and (labels[brain] == expected[brain]).all()
