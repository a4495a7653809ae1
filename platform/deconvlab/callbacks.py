"""Lightning callbacks the platform adds to every run."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import MLFlowLogger

from deconvlab.tracking import log_images, save_images


class SampleImages(pl.Callback):
    """Writes the images a task rendered at the end of validation (input / output / target).

    With an MLflow logger they become artifacts ``samples/epoch_NNN/*.png`` of the run; without one
    (a sweep trial, whose run is logged by the sweep driver) they are written under
    ``<default_root_dir>/samples/epoch_NNN/`` and travel with the trial's checkpoint.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        images = getattr(pl_module, "rendered_samples", None)
        if not images or not trainer.is_global_zero:
            return
        folder = f"samples/epoch_{trainer.current_epoch:03d}"
        mlflow_logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if mlflow_logger is not None:
            log_images(mlflow_logger.experiment, mlflow_logger.run_id, images, folder)
        else:
            save_images(images, Path(trainer.default_root_dir) / folder)
        pl_module.rendered_samples = {}
