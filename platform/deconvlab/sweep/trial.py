"""One sweep trial: compose the trial's config and run the same ``train(cfg)`` as a single run.

Trials never write to MLflow (concurrent SQLite writers lock each other out, and a trial on another
node may not reach the store): they report metrics and a checkpoint folder to Ray, and the sweep
driver's callback logs the child runs. The checkpoint folder carries the epoch's sample images and the
config the trial ran (``config.yaml``, resolved), so they reach the driver through Ray's storage wherever
the trial ran: the child run's config is the trial's own, not one the driver composed again.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytorch_lightning as pl
import torch
from ray import tune

from deconvlab.console import quiet_third_party
from deconvlab.sweep.distributed import fit_with_ray_train
from deconvlab.sweep.spec import trial_config
from deconvlab.sweep.trial_callbacks import (
    RESUMED_KEY,
    ReportToRay,
    RestoreSampledOptimiserSettings,
    checkpoint_file,
    sampled_optimiser_settings,
)
from deconvlab.train import train


def resume_point(checkpoint: tune.Checkpoint | None) -> tuple[str | None, dict[str, float]]:
    """The Lightning checkpoint to resume from, and ``resumed_from_epoch`` to report (a restarted trial)."""
    if checkpoint is None:
        return None, {}
    path = checkpoint_file(checkpoint)
    epoch = torch.load(path, map_location="cpu", weights_only=True).get("epoch", -1) + 1
    return path, {RESUMED_KEY: float(epoch)}


def run_trial(sampled: dict[str, Any], sweep: dict[str, Any], extra_overrides: list[str],
              storage_path: str | None = None, verbose: bool = False) -> None:
    """The Tune function trainable.

    Args:
        sampled: Tune's config: dotted Hydra keys -> this trial's values.
        sweep: the sweep spec as a dict (:meth:`~.spec.SweepSpec.to_dict`).
        extra_overrides: Hydra overrides given on the command line, for every trial.
        storage_path: Ray's storage, where a multi-worker trial's Ray Train run keeps its checkpoints.
        verbose: keep the stack's chatter in this worker's output (``deconvlab sweep --verbose``).
    """
    quiet_third_party(verbose)  # this Ray worker is a process of its own: the CLI's filters are not here
    context = tune.get_context()
    output_dir = os.path.join(tempfile.gettempdir(), "deconvlab-trials", context.get_trial_id())
    cfg = trial_config(sweep, sampled, output_dir, extra_overrides)
    cfg.ckpt_path, resumed = resume_point(tune.get_checkpoint())
    workers = int(sweep.get("workers_per_trial", 1))
    if workers > 1:
        fit_with_ray_train(cfg, workers, sweep["resources"], context.get_trial_name(), storage_path,
                           sampled_optimiser_settings(sampled))
        return
    callbacks: list[pl.Callback] = [ReportToRay(tune.report, resumed, config=cfg)]
    if cfg.ckpt_path:
        callbacks.append(RestoreSampledOptimiserSettings(sampled_optimiser_settings(sampled)))
    train(cfg, callbacks=callbacks)
