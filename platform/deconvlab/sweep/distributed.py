"""A trial with several data-parallel workers: Ray Train's TorchTrainer running ``train(cfg)`` with DDP.

The Tune trial is a light driver that starts a TorchTrainer; each worker runs the same ``train(cfg)``
with Ray's DDP strategy (NCCL on GPUs, gloo on CPUs) and reports through ``ray.train.report``;
Tune's ``TuneReportCallback`` forwards rank 0's metrics (and the checkpoint's path) to the trial.
"""

from __future__ import annotations

from typing import Any

import ray.train
from omegaconf import DictConfig, OmegaConf
from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from deconvlab.sweep.trial_callbacks import ReportToRay, RestoreSampledOptimiserSettings, checkpoint_file
from deconvlab.train import train


def _worker_loop(config: dict[str, Any]) -> None:
    cfg = OmegaConf.create(config["cfg"])
    callbacks = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        cfg.ckpt_path = checkpoint_file(checkpoint)
        callbacks.append(RestoreSampledOptimiserSettings(config["optimiser_settings"]))
    # Each rank writes its own folder; rank 0's checkpoint, samples and config are the ones reported.
    cfg.paths.output_dir = f"{cfg.paths.output_dir}/rank{ray.train.get_context().get_world_rank()}"
    callbacks.insert(0, ReportToRay(ray.train.report, config=cfg))  # cfg as train() runs it
    train(cfg, callbacks=callbacks,
          trainer_overrides={"strategy": RayDDPStrategy(), "plugins": [RayLightningEnvironment()],
                             "devices": "auto", "use_distributed_sampler": True})


def fit_with_ray_train(cfg: DictConfig, workers: int, resources: dict[str, float], name: str,
                       storage_path: str | None = None, optimiser_settings: dict[str, Any] | None = None) -> None:
    """Train ``cfg`` on ``workers`` Ray Train workers, each with ``resources``.

    Args:
        cfg: the trial's composed config.
        workers: how many DDP workers.
        resources: per worker: ``cpu`` and ``gpu`` (may be fractional).
        name: the Ray Train run's name (the trial's name: a restored trial finds its run again).
        storage_path: Ray's storage for the workers' checkpoints (shared storage on a cluster).
        optimiser_settings: the trial's sampled ``optim.*`` values, put back after a resume.
    """
    gpu = float(resources.get("gpu", 0))
    per_worker = {"CPU": float(resources.get("cpu", 1))} | ({"GPU": gpu} if gpu else {})
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True),
                           "optimiser_settings": dict(optimiser_settings or {})},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu > 0,
                                               resources_per_worker=per_worker),
        # A deterministic name: a restored trial finds its Ray Train run again.
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
