"""train(cfg) per task: a few steps reduce the loss, and the MLflow run holds everything."""

import pytest
import torch
from mlflow.tracking import MlflowClient

from deconvlab.build import build_task
from deconvlab.train import train

# (experiment overrides, metric keys the run must have); more families add their own cases.
TASK_CASES = {
    "restoration": (["experiment=quickstart", "data.samples_per_epoch=64", "data.max_eval_size=64",
                     "trainer.limit_train_batches=8"],
                    {"val/psnr", "val/ssim", "val/psnr_input", "val/psnr_pooled", "val/loss", "train/loss_epoch"}),
    "reconstruction": (["experiment=autoencoder_fc", "data.max_samples=512", "optim.lr=3e-3"],
                       {"val/mse", "val/bce", "val/loss", "model/num_params"}),
    "segmentation": (["experiment=fcn8s_shapes"], {"val/miou", "val/pixel_acc", "val/class_acc"}),
    "volumetric": (["experiment=phantom_tinyvol", "data.volume_size=24", "data.patch_size=12", "optim.lr=1e-2",
                    "trainer.max_epochs=3", "trainer.limit_train_batches=8"],
                   {"val/dice_whole", "val/dice_core", "val/dice_enhancing", "val/dice_mean"}),
}


def _validation_loss(task, datamodule) -> float:
    task.eval()
    with torch.no_grad():
        losses = [task.step(batch)[0] for batch in datamodule.val_dataloader()]
    return float(torch.stack(losses).mean())


def _assert_learns_and_is_tracked(cfg, result, metric_keys, tracking_uri):
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    pl.seed_everything(cfg.seed)
    untrained = build_task(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup("validate")
    before = _validation_loss(untrained, datamodule)
    trained = build_task(cfg)
    trained.load_state_dict(torch.load(result.best_checkpoint, weights_only=True)["state_dict"])
    assert _validation_loss(trained, datamodule) < before

    client = MlflowClient(tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert metric_keys <= set(run.data.metrics)
    assert run.data.params["trainer.max_epochs"] == str(cfg.trainer.max_epochs)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "checkpoints", "samples", "model_summary.txt"} <= artifacts
    assert run.data.metrics["cost/params"] == sum(p.numel() for p in trained.model.parameters())
    assert run.data.metrics["cost/macs_per_pixel"] > 0
    history = client.get_metric_history(result.run_id, cfg.task.monitor)
    assert len(history) == cfg.trainer.max_epochs  # one value per epoch


@pytest.mark.parametrize("task_name", sorted(TASK_CASES))
def test_task_learns_and_run_is_tracked(task_name, compose, tracking_uri):
    overrides, metric_keys = TASK_CASES[task_name]
    cfg = compose(*overrides)
    result = train(cfg)
    _assert_learns_and_is_tracked(cfg, result, metric_keys, tracking_uri)


def test_failed_run_ends_failed_with_the_error(compose, tracking_uri):
    import pytorch_lightning as pl

    class Explode(pl.Callback):
        def on_train_batch_end(self, *args, **kwargs):
            raise RuntimeError("boom in training")

    cfg = compose("experiment=quickstart", "data.samples_per_epoch=32", "data.max_eval_size=32")
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, callbacks=[Explode()])
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FAILED" and "boom in training" in run.data.tags["error"]


def test_untracked_trial_mode_writes_no_run(compose, tracking_uri, tmp_path):
    cfg = compose("experiment=quickstart", "logger=none", "data.samples_per_epoch=32", "data.max_eval_size=32")
    result = train(cfg)
    assert result.run_id is None and result.best_checkpoint and "val/psnr" in result.metrics
    assert not (tmp_path / "mlflow.db").exists()
    # Without an MLflow run, sample images land beside the checkpoints (the sweep driver picks them up).
    assert list((tmp_path / "outputs").rglob("samples/epoch_*/*.png"))


def test_segmentation_logs_a_confusion_matrix(compose, tracking_uri):
    result = train(compose("experiment=fcn8s_shapes", "trainer.max_epochs=1"))
    files = {a.path for a in MlflowClient(tracking_uri).list_artifacts(result.run_id, "samples/epoch_000")}
    assert "samples/epoch_000/confusion_matrix.png" in files


def test_two_dimensional_codes_are_drawn_as_a_scatter(compose, tracking_uri):
    cfg = compose("experiment=autoencoder_fc", "data.max_samples=256", "model.code_size=2", "trainer.max_epochs=1")
    result = train(cfg)
    client = MlflowClient(tracking_uri)
    files = {a.path for a in client.list_artifacts(result.run_id, "samples/epoch_000")}
    assert "samples/epoch_000/code_scatter.png" in files


def test_diverged_training_fails_the_run_with_the_reason(compose, tracking_uri):
    cfg = compose("experiment=quickstart", "data.samples_per_epoch=32", "data.max_eval_size=32", "optim.lr=1e30",
                  "optim=sgd")
    with pytest.raises(FloatingPointError, match="diverged"):
        train(cfg)
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FAILED" and "not finite" in run.data.tags["error"]


def test_last_checkpoint_is_the_latest_epoch_when_the_best_is_older(compose, tmp_path):
    # At lr 0 (no normalisation layers to move) every epoch scores the same, so only epoch 0 is a "best";
    # last.ckpt, what a resume reads, must still be the third epoch, not a copy of the best.
    output = tmp_path / "run"
    train(compose("experiment=quickstart", "logger=none", "optim.lr=0", "trainer.max_epochs=3",
                  "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "data.batch_size=4",
                  "data.patch_size=24", "data.samples_per_epoch=64", "data.max_eval_size=32", "model.width=8",
                  "model.depth=3", f"paths.output_dir={output}"))
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-epoch000.ckpt", "last.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 6)
