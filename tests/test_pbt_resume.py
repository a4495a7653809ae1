"""PBT continues a trial from a donor's checkpoint: the trial's own (mutated) optimiser settings must win."""

import pytest
import pytorch_lightning as pl

from conftest import run_smoke_sweep
from deconvlab.sweep.trial_callbacks import RestoreSampledOptimiserSettings, sampled_optimiser_settings
from deconvlab.train import train


class _RecordLearningRate(pl.Callback):
    """Records the learning rate the first training batch actually uses."""

    def __init__(self) -> None:
        self.lr: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.lr is None:
            self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def _resume_with(compose, donor_checkpoint: str, callbacks: list[pl.Callback]) -> None:
    cfg = compose("experiment=quickstart", "logger=none", "optim.lr=0.0123", "trainer.max_epochs=2",
                  "trainer.limit_train_batches=1", "trainer.limit_val_batches=1")
    cfg.ckpt_path = donor_checkpoint
    train(cfg, callbacks=callbacks)


def test_mutated_learning_rate_survives_resuming_from_a_donor_checkpoint(compose, tmp_path):
    donor = compose("experiment=quickstart", "logger=none", "optim.lr=0.001", "trainer.max_epochs=1",
                    "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                    f"paths.output_dir={tmp_path / 'donor'}")
    checkpoint = str(tmp_path / "donor" / "checkpoints" / "last.ckpt")
    train(donor)

    without = _RecordLearningRate()
    _resume_with(compose, checkpoint, [without])
    # The bug this guards against: Lightning restores the donor's param groups, lr included.
    assert without.lr == 0.001

    settings = sampled_optimiser_settings({"optim.lr": 0.0123, "model.width": 8})
    assert settings == {"lr": 0.0123}
    with_fix = _RecordLearningRate()
    _resume_with(compose, checkpoint, [RestoreSampledOptimiserSettings(settings), with_fix])
    assert with_fix.lr == 0.0123


class _RecordLearningRates(pl.Callback):
    """The lr each epoch's first training batch uses."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_mutated_learning_rate_survives_a_restored_lr_schedule(compose, tmp_path):
    halving = "scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1,gamma:0.5}"
    short = ["experiment=quickstart", "logger=none", halving, "trainer.limit_train_batches=1",
             "trainer.limit_val_batches=1"]
    train(compose(*short, "optim.lr=0.001", "trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'donor'}"))
    cfg = compose(*short, "optim.lr=0.0128", "trainer.max_epochs=3")
    cfg.ckpt_path = str(tmp_path / "donor" / "checkpoints" / "last.ckpt")
    recorder = _RecordLearningRates()
    train(cfg, callbacks=[RestoreSampledOptimiserSettings({"lr": 0.0128}), recorder])
    # The donor's schedule had halved once; the trial goes on from there with its own base lr.
    assert recorder.lrs == pytest.approx([0.0064, 0.0032])


@pytest.mark.slow
def test_pbt_sweep_logs_each_trials_learning_rate_schedule_and_promotes(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from deconvlab.promote import promote

    outcome = run_smoke_sweep("quickstart_pbt", tmp_path / "ray")
    client = MlflowClient(tracking_uri)
    children = client.search_runs([client.get_experiment_by_name(outcome.experiment_name).experiment_id],
                                  f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(children) == 2 and all(run.info.status == "FINISHED" for run in children)
    for run in children:
        schedule = client.get_metric_history(run.info.run_id, "hp/optim.lr")
        reported = client.get_metric_history(run.info.run_id, "val/psnr")
        # One learning rate per reported epoch (a trial that exploits a finished donor reports fewer than 3).
        assert sorted(p.step for p in schedule) == sorted(p.step for p in reported) and schedule
        assert all(1e-4 * 0.8**3 <= point.value <= 1e-2 * 1.2**3 for point in schedule)
        # The child's config.yaml is the one the trial wrote into its checkpoint, and the training compute
        # it reported comes with every epoch.
        assert run.data.tags["deconvlab.config_source"] == "trial"
        compute = client.get_metric_history(run.info.run_id, "compute/train_macs")
        assert sorted(p.step for p in compute) == sorted(p.step for p in reported)
    assert promote(outcome.parent_run_id, "quickstart-pbt-smoke").moved
