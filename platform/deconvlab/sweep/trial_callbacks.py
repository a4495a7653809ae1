"""What a trial's training reports to Ray: shared by a one-process trial and by every DDP worker of one.

A trial (:mod:`.trial`) and the Ray Train workers of a multi-worker trial (:mod:`.distributed`) run the
same ``train(cfg)`` with these Lightning callbacks: :class:`ReportToRay` sends each validation's metrics
(with the training compute so far) and a checkpoint folder (holding the trial's resolved ``config.yaml`` and
the epoch's sample images) to Ray, and
:class:`RestoreSampledOptimiserSettings` keeps a resumed trial's own optimiser settings. The names of
what they report are here too, for the driver (:mod:`.child_runs`) and the sweep report to read back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import ray
import torch
from omegaconf import DictConfig, OmegaConf
from ray.tune import Checkpoint

from deconvlab.callbacks import training_compute
from deconvlab.sweep.records import SAMPLES_DIR

# The Lightning checkpoint inside every Ray checkpoint folder, the config the trial ran and the sample
# images beside it.
CHECKPOINT_FILE = "checkpoint.ckpt"
CONFIG_FILE = "config.yaml"
# Keys added to every report so the driver can tell how far a trial got, and where it ran.
EPOCH_KEY = "epoch"
RESUMED_KEY = "resumed_from_epoch"
NODE_KEY = "node_id"


def _node_id() -> str:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def checkpoint_file(checkpoint: Checkpoint) -> str:
    """The Lightning checkpoint inside a Ray checkpoint (downloaded first when Ray's storage is remote)."""
    return os.path.join(checkpoint.to_directory(), CHECKPOINT_FILE)


class ReportToRay(pl.Callback):
    """After each validation: report the scalar metrics and a checkpoint folder to Ray.

    The metrics include the ``compute/*`` totals of the trainer's ``TrainingCompute`` callback; the folder
    holds the Lightning checkpoint, the epoch's sample images and, with ``config``, the resolved config
    as ``config.yaml``: the sweep driver logs that file as the child run's config.

    Args:
        report: ``ray.tune.report`` for a single-worker trial, ``ray.train.report`` inside Ray Train
            workers (every rank must call it; rank 0 attaches the checkpoint).
        extra: constant values added to every report (``resumed_from_epoch`` after a restart).
        config: the config given to ``train(cfg)`` with this callback (resolved here, once).
    """

    def __init__(self, report: Callable[..., None], extra: dict[str, float] | None = None,
                 config: DictConfig | None = None) -> None:
        self.report, self.extra = report, dict(extra or {})
        self.config_yaml = OmegaConf.to_yaml(config, resolve=True) if config is not None else None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1}
        metrics[EPOCH_KEY] = trainer.current_epoch + 1
        metrics[NODE_KEY] = _node_id()
        metrics.update(training_compute(trainer))  # every rank: summing over ranks is a collective
        metrics.update(self.extra)
        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(os.path.join(folder, CHECKPOINT_FILE))
            samples = Path(trainer.default_root_dir) / SAMPLES_DIR / f"epoch_{trainer.current_epoch:03d}"
            if trainer.is_global_zero and samples.is_dir():
                shutil.copytree(samples, Path(folder) / SAMPLES_DIR / samples.name)
            if trainer.is_global_zero and self.config_yaml is not None:
                (Path(folder) / CONFIG_FILE).write_text(self.config_yaml)
            checkpoint = Checkpoint.from_directory(folder) if trainer.is_global_zero else None
            self.report(metrics, checkpoint=checkpoint)


class RestoreSampledOptimiserSettings(pl.Callback):
    """Put a trial's sampled optimiser settings back after resuming from a checkpoint.

    PBT continues a trial from another trial's checkpoint, and Lightning restores the optimiser's
    state with it, param-group hyperparameters included: without this, a mutated ``optim.lr`` would
    be silently replaced by the donor trial's learning rate.

    Args:
        settings: optimiser hyperparameters by name (``{"lr": 0.01}``), set in every param group
            that has them.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = dict(settings)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after Lightning restored the optimiser and scheduler states from the checkpoint.
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        for optimizer in trainer.optimizers:
            for index, group in enumerate(optimizer.param_groups):
                for name, value in self.settings.items():
                    if name in group and name != "lr":
                        group[name] = value
                if "lr" in self.settings:
                    self._restore_lr(optimizer, index, schedulers)

    def _restore_lr(self, optimizer: torch.optim.Optimizer, index: int, schedulers: list) -> None:
        """Rescale the group's lr to the sampled base lr, keeping the donor's progress through a schedule."""
        group, lr = optimizer.param_groups[index], float(self.settings["lr"])
        donor_base = group.get("initial_lr", group["lr"])
        group["lr"] = group["lr"] * lr / donor_base if donor_base else lr
        if "initial_lr" in group:
            group["initial_lr"] = lr
        for scheduler in schedulers:
            # Schedulers compute each step's lr from base_lrs, which Lightning restored from the donor.
            if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs[index] = lr


def sampled_optimiser_settings(sampled: dict[str, Any]) -> dict[str, Any]:
    """The optimiser hyperparameters among a trial's sampled keys: ``optim.lr`` -> ``lr``."""
    return {key.split(".", 1)[1]: value for key, value in sampled.items() if key.startswith("optim.")}
