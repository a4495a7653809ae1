"""MRI patch nets: dense labelling equals the patch classifier; the context pathway is used; they train."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import start_local_ray
from deconvlab.data.brats import BRATS_REGIONS
from deconvlab.data.patches import PatchGeometry, extract_patch, pad_image
from deconvlab.models.mri import CascadeCNN3d, DualPathwayCNN3d, PatchNetEnsemble, TwoPathCNN
from deconvlab.train import train
from deconvlab.volume.metrics import region_metrics
from deconvlab.volume.report import evaluate_cases


def _randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    # Non-trivial running statistics, so eval-mode BatchNorm is a real per-channel affine map.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("factor", [1, 3, 5])
def test_dual_pathway_dense_logits_equal_forward_on_centred_patches(factor):
    torch.manual_seed(0)
    model = _randomise_norms(DualPathwayCNN3d(2, 5, widths=[4, 4, 6], context_factor=factor, fc_width=8))
    geometry = PatchGeometry(3, model.patch_size, factor)
    assert geometry.margin == model.margin
    image = np.random.default_rng(0).standard_normal((2, 9, 10, 11)).astype(np.float32)
    padded = pad_image(image, model.margin)
    with torch.no_grad():
        dense = model.dense_logits(torch.from_numpy(padded)[None])[0]
        centres = [(0, 0, 0), (4, 5, 6), (8, 9, 10), (1, 7, 2)]
        patches = torch.stack([torch.from_numpy(extract_patch(padded, c, geometry)) for c in centres])
        per_patch = model(patches)
    assert dense.shape == (5, 9, 10, 11)
    for logits, centre in zip(per_patch, centres, strict=False):
        torch.testing.assert_close(logits, dense[(slice(None), *centre)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", [17, 18])  # not a multiple of the dilation, and one that is
def test_dilated_context_pathway_in_training_mode_equals_a_dilated_convolution(side):
    """Training-mode BatchNorm takes batch statistics, so only the voxels of a true dilated
    convolution may enter them (no padding)."""
    import copy

    from deconvlab.models.mri import _run_dilated

    torch.manual_seed(0)
    pathway = DualPathwayCNN3d(2, 5, widths=[4, 4], context_factor=3, fc_width=8).context.train()
    reference = copy.deepcopy(pathway)
    for module in reference.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.dilation = (3, 3, 3)
    x = torch.randn(2, 2, side, side + 1, side - 1)
    torch.testing.assert_close(_run_dilated(pathway, x, 3), reference(x), atol=1e-5, rtol=1e-5)


def test_two_path_dense_logits_equal_forward_on_centred_patches():
    torch.manual_seed(0)
    model = TwoPathCNN(6, 5, local_width=4, global_width=6).eval()
    image = torch.randn(1, 6, 40, 37)
    with torch.no_grad():
        dense = model.dense_logits(image)[0]
        assert dense.shape == (5, 8, 5)
        for y, x in [(0, 0), (7, 4), (3, 2)]:
            patch = image[:, :, y:y + 33, x:x + 33]
            torch.testing.assert_close(model(patch)[0], dense[:, y, x], atol=1e-5, rtol=1e-5)


def test_the_context_pathway_changes_the_prediction():
    torch.manual_seed(0)
    model = DualPathwayCNN3d(2, 5, widths=[4, 4], context_factor=3, fc_width=8).eval()
    x = torch.randn(3, 4, 5, 5, 5)
    y = x.clone()
    y[:, 2:] += 1.0  # context channels only
    with torch.no_grad():
        assert not torch.allclose(model(x), model(y))
        y = x.clone()
        y[:, :2] += 1.0  # normal channels only
        assert not torch.allclose(model(x), model(y))


def test_a_wrong_patch_size_says_which_key_to_set():
    with pytest.raises(ValueError, match="data.patch_size=9"):
        DualPathwayCNN3d(2, 5, widths=[4] * 4)(torch.randn(1, 4, 11, 11, 11))
    with pytest.raises(ValueError, match="odd"):
        DualPathwayCNN3d(2, 5, context_factor=2)


@pytest.mark.parametrize("experiment", ["deepmedic_p9_ctx3_phantom", "twopath_cnn_p33_2p5d_phantom",
                                        "cascade_deepmedic_p35_phantom"])
def test_experiment_trains_end_to_end_and_writes_its_plan(experiment, compose, tmp_path):
    cfg = compose(f"experiment={experiment}", "logger=none", "data.phantom_size=24", "data.phantom_cases=2",
                  "data.samples_per_epoch=64", "data.eval_samples=64", "data.batch_size=16")
    result = train(cfg)
    assert {"val/dice_whole", "val/dice_core", "val/dice_enhancing", "val/dice_mean"} <= set(result.metrics)
    # Better than a trivial predictor: calling the whole brain tumour (Dice 0.16 and 0.35 on the two
    # validation phantoms, mean 0.25). Measured at this budget (seeds 0, 1): 0.52-0.87 per-case mean whole
    # tumour Dice. Catches a net that learnt "everything is tumour" (or nothing), dense inference that
    # does not match the trained patch classifier, and a figure that is not the cases' Dice.
    brain_as_tumour = [region_metrics(np.where(case.brain, 2, 0), case.label, BRATS_REGIONS)["dice_whole"]
                       for case in instantiate(cfg.data).cases("val")]
    assert result.metrics["val/volume_dice_whole"] > np.mean(brain_as_tumour) + 0.15
    plan = json.loads((Path(cfg.paths.output_dir) / "patch_plan.json").read_text())
    # The patch the data cut is the one the net classifies (the cascade's: its own, via data.layout_of).
    assert plan["patch_size"] == instantiate(cfg.model).patch_size and len(plan["label_fractions"]) == 5
    # The last epoch labelled both validation volumes densely: one row per case and stage (untracked run).
    with open(Path(cfg.paths.output_dir) / "volume" / "per_case_epoch001.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["stage"]) for r in rows] == [(c, s) for c in ("phantom5000", "phantom5001")
                                                       for s in ("raw", "cleaned")]
    assert {"dice_whole", "dice_core", "dice_enhancing", "sensitivity_whole", "hd95_whole"} <= set(rows[0])
    assert result.metrics["val/volume_dice_whole_cleaned"] == pytest.approx(
        np.mean([float(r["dice_whole"]) for r in rows if r["stage"] == "cleaned"]), abs=1e-3)


@pytest.mark.slow  # a tracked run: ~10 s, most of it MLflow
def test_volume_evaluation_is_logged_to_mlflow(compose, tracking_uri):
    from mlflow.tracking import MlflowClient

    cfg = compose("experiment=deepmedic_p9_ctx3_phantom", "data.phantom_size=20", "data.phantom_cases=1",
                  "data.samples_per_epoch=32", "data.eval_samples=32", "data.batch_size=16", "trainer.max_epochs=1")
    result = train(cfg)
    client = MlflowClient(tracking_uri)
    folders = ("volume", "samples/epoch_000")
    logged = {a.path for folder in folders for a in client.list_artifacts(result.run_id, folder)}
    assert logged == {"volume/per_case_epoch000.csv",
                      "samples/epoch_000/phantom5000_contours_truth_green_prediction_red.png"}
    metrics = client.get_run(result.run_id).data.metrics
    assert {"val/volume_dice_whole", "val/volume_dice_whole_cleaned"} <= set(metrics)

    # `deconvlab evaluate` logs the same per-case table and overlays on its evaluation run.
    from deconvlab.evaluate import evaluate

    evaluation = evaluate(f"runs:/{result.run_id}")
    logged = {a.path for a in client.list_artifacts(evaluation.run_id, "volume")}
    assert logged == {"volume/per_case.csv", "volume/phantom5000_contours_truth_green_prediction_red.png"}
    table = Path(client.download_artifacts(evaluation.run_id, "volume/per_case.csv")).read_text().splitlines()
    assert table[0].startswith("case") and len(table) > 1 and "phantom5000" in table[1]


@pytest.mark.slow  # a Ray cluster and three short trials: ~1 minute
def test_context_sweep_smoke_test_runs_every_context_factor(tmp_path, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient

    from deconvlab.sweep.runner import run_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DECONVLAB_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    start_local_ray()
    try:
        outcome = run_sweep("deepmedic_context_phantom", smoke_test=True, storage_path=str(tmp_path / "ray"),
                            quiet=True)
    finally:
        ray.shutdown()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(outcome.experiment_name)
    parent = f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'"
    children = client.search_runs([experiment.experiment_id], parent)
    assert sorted(int(c.data.params["data.context_factor"]) for c in children) == [1, 3, 5]
    assert all(c.info.status == "FINISHED" and "val/dice_mean" in c.data.metrics for c in children)


def test_cascade_feeds_the_first_nets_probabilities_to_the_second():
    """An independent composition: the first net classifies every voxel of the second net's normal
    patch (its own patch + context cut), those probabilities join the modalities, the second classifies."""
    torch.manual_seed(0)
    cascade = CascadeCNN3d(2, 5, first_widths=[4, 4], second_widths=[4, 4], fc_width=8)
    for net in (cascade.first, cascade.second):
        _randomise_norms(net)
    cascade.eval()
    image = np.random.default_rng(1).standard_normal((2, 6, 7, 8)).astype(np.float32)
    centre = np.array([3, 2, 5])
    first_geometry, second_geometry = PatchGeometry(3, 5, 3), PatchGeometry(3, 5, 3)
    padded = pad_image(image, cascade.margin)
    with torch.no_grad():
        offsets = np.argwhere(np.ones((5, 5, 5), bool)) - 2
        patches = np.stack([extract_patch(pad_image(image, first_geometry.margin), centre + o, first_geometry)
                            for o in offsets])
        probabilities = torch.softmax(cascade.first(torch.from_numpy(patches)), 1).T.reshape(5, 5, 5, 5)
        own = torch.from_numpy(extract_patch(pad_image(image, second_geometry.margin), centre, second_geometry))
        packed = torch.cat([own[:2], probabilities, own[2:]])[None]  # normal (+probabilities), then context
        expected = cascade.second(packed)[0]
        region = torch.from_numpy(extract_patch(padded, centre, PatchGeometry(3, cascade.patch_size, 1)))
        torch.testing.assert_close(cascade(region[None])[0], expected, atol=1e-5, rtol=1e-5)
    assert cascade.patch_size == 19 and cascade.second.normal[0][0].in_channels == 2 + 5


def test_ensemble_probability_is_the_mean_of_its_members():
    torch.manual_seed(0)
    ensemble = PatchNetEnsemble(lambda: DualPathwayCNN3d(2, 5, widths=[4, 4], fc_width=8), size=3).eval()
    x = torch.randn(4, 4, 5, 5, 5)
    with torch.no_grad():
        members = torch.stack([torch.softmax(m(x), 1) for m in ensemble.members]).mean(0)
        torch.testing.assert_close(torch.softmax(ensemble(x), 1), members)
    assert not torch.allclose(ensemble.members[0].fuse[0].weight, ensemble.members[1].fuse[0].weight)


def test_validate_labels_the_volumes_and_leaves_the_table_to_the_caller(compose, tmp_path, monkeypatch):
    import pytorch_lightning as pl

    from deconvlab.build import build_task

    monkeypatch.chdir(tmp_path)
    cfg = compose("experiment=deepmedic_p9_ctx3_phantom", "data.phantom_size=20", "data.phantom_cases=1",
                  "data.eval_samples=32", "data.batch_size=16")
    task = build_task(cfg)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (results,) = trainer.validate(task, datamodule=instantiate(cfg.data), verbose=False)
    assert [r["stage"] for r in task.volume_rows] == ["raw", "cleaned"]
    assert results["val/volume_dice_whole"] == pytest.approx(task.volume_rows[0]["dice_whole"], abs=1e-4)
    assert list(task.volume_overlays) == ["phantom5000_contours_truth_green_prediction_red"]
    assert not list(tmp_path.iterdir())  # nothing written where `deconvlab evaluate` was started


def test_volume_evaluation_under_bf16_mixed_precision_runs_in_full_precision(compose, tmp_path, monkeypatch):
    import pytorch_lightning as pl

    from deconvlab.build import build_task

    monkeypatch.chdir(tmp_path)
    cfg = compose("experiment=deepmedic_p9_ctx3_phantom", "data.phantom_size=20", "data.phantom_cases=1",
                  "data.eval_samples=32", "data.batch_size=16")
    task = build_task(cfg)
    data = instantiate(cfg.data)
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(task, datamodule=data, verbose=False)
    expected, _ = evaluate_cases(task.model.eval(), data.eval_set.cases, task.regions, tile=task.volume_tile,
                                 clean=task.clean_up)
    def timeless(rows):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert timeless(task.volume_rows) == timeless(expected)  # the numbers of a float32 run outside autocast
