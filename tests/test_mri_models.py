"""MRI patch nets: dense labelling equals the patch classifier; the context pathway is used; they train."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import start_local_ray
from deconvlab.data.brats import PatchGeometry, extract_patch, pad_image
from deconvlab.models.mri import DualPathwayCNN3d, TwoPathCNN
from deconvlab.train import train


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


@pytest.mark.parametrize("experiment", ["deepmedic_p9_ctx3_phantom", "twopath_cnn_p33_2p5d_phantom"])
def test_experiment_trains_end_to_end_and_writes_its_plan(experiment, compose, tmp_path):
    cfg = compose(f"experiment={experiment}", "logger=none", "data.phantom_size=24", "data.phantom_cases=2",
                  "data.samples_per_epoch=64", "data.eval_samples=64", "data.batch_size=16")
    result = train(cfg)
    assert {"val/dice_whole", "val/dice_core", "val/dice_enhancing", "val/dice_mean"} <= set(result.metrics)
    assert 0.0 <= result.metrics["val/dice_mean"] <= 1.0
    plan = json.loads((Path(cfg.paths.output_dir) / "patch_plan.json").read_text())
    assert plan["patch_size"] == cfg.data.patch_size and len(plan["label_fractions"]) == 5


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
