"""PBT continues a trial from a donor's checkpoint: the trial's own (mutated) optimiser settings must win."""

import pytorch_lightning as pl

from deconvlab.sweep.trial import RestoreSampledOptimiserSettings, sampled_optimiser_settings
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
