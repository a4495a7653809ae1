"""One sweep trial: compose the trial's config and run the same ``train(cfg)`` as a single run.

Trials never write to MLflow (concurrent SQLite writers lock each other out, and a trial on another
node may not reach the store): they report metrics and a checkpoint folder to Ray, and the sweep
driver's callback logs the child runs. The checkpoint folder carries the epoch's sample images too, so
they reach the driver through Ray's storage wherever the trial ran.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

CHECKPOINT_FILE = "checkpoint.ckpt"
SAMPLES_DIR = "samples"
# Keys added to every report so the driver can tell how far a trial got.
EPOCH_KEY = "epoch"
RESUMED_KEY = "resumed_from_epoch"
NODE_KEY = "node_id"


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


class ReportToRay(pl.Callback):
    """After each validation: report the scalar metrics and a checkpoint folder to Ray.

    Args:
        report: ``ray.tune.report`` for a single-worker trial, ``ray.train.report`` inside Ray Train
            workers (every rank must call it; rank 0 attaches the checkpoint).
    """

    def __init__(self, report: Callable[..., None], extra: dict[str, float] | None = None) -> None:
        self.report, self.extra = report, dict(extra or {})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if isinstance(v, torch.Tensor) and v.numel() == 1}
        metrics[EPOCH_KEY] = trainer.current_epoch + 1
        metrics[NODE_KEY] = _node_id()
        metrics.update(self.extra)
        from ray.tune import Checkpoint

        with tempfile.TemporaryDirectory() as folder:
            trainer.save_checkpoint(os.path.join(folder, CHECKPOINT_FILE))
            samples = Path(trainer.default_root_dir) / SAMPLES_DIR / f"epoch_{trainer.current_epoch:03d}"
            if trainer.is_global_zero and samples.is_dir():
                shutil.copytree(samples, Path(folder) / SAMPLES_DIR / samples.name)
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


def trial_config(sweep: dict[str, Any], sampled: dict[str, Any], output_dir: str, extra: list[str]):
    """The composed config of one trial (also used by the driver to log the child run's config)."""
    from deconvlab.config import compose_config
    from deconvlab.sweep.spec import SweepSpec

    spec = SweepSpec.from_dict(sweep)
    overrides = [*spec.trial_overrides(sampled), *extra, "logger=none", f"paths.output_dir={output_dir}"]
    return compose_config(overrides)


def resume_point(checkpoint) -> tuple[str | None, dict[str, float]]:
    """The Lightning checkpoint to resume from, and ``resumed_from_epoch`` to report (a restarted trial)."""
    if checkpoint is None:
        return None, {}
    path = os.path.join(checkpoint.to_directory(), CHECKPOINT_FILE)
    epoch = torch.load(path, map_location="cpu", weights_only=True).get("epoch", -1) + 1
    return path, {RESUMED_KEY: float(epoch)}


def run_trial(sampled: dict[str, Any], sweep: dict[str, Any], extra_overrides: list[str],
              storage_path: str | None = None) -> None:
    """The Tune function trainable. ``sampled`` is Tune's config: dotted Hydra keys -> values."""
    from ray import tune

    from deconvlab.train import train

    context = tune.get_context()
    output_dir = os.path.join(tempfile.gettempdir(), "deconvlab-trials", context.get_trial_id())
    cfg = trial_config(sweep, sampled, output_dir, extra_overrides)
    cfg.ckpt_path, resumed = resume_point(tune.get_checkpoint())
    workers = int(sweep.get("workers_per_trial", 1))
    if workers > 1:
        from deconvlab.sweep.distributed import fit_with_ray_train

        fit_with_ray_train(cfg, workers, sweep["resources"], context.get_trial_name(), storage_path,
                           sampled_optimiser_settings(sampled))
    else:
        callbacks: list[pl.Callback] = [ReportToRay(tune.report, resumed)]
        if cfg.ckpt_path:
            callbacks.append(RestoreSampledOptimiserSettings(sampled_optimiser_settings(sampled)))
        train(cfg, callbacks=callbacks)
