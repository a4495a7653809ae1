"""``train(cfg)``: the one code path for a single run and for a sweep trial.

A single run (``deconvlab train``) opens its own MLflow run here. A sweep trial composes the same
config with ``logger.enabled=false`` and passes Tune's reporting callback in ``callbacks``: the sweep
driver then logs the trial's child run, so trials never write to the tracking store themselves.
"""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from deconvlab import cost, tracking
from deconvlab.build import build_datamodule, build_task, build_trainer, checkpoint_model_weights
from deconvlab.errors import UserError, first_line
from deconvlab.perf import apply_perf
from deconvlab.tasks.base import BaseTask


@dataclass
class TrainResult:
    """What a finished run returns.

    Attributes:
        metrics: the last logged value of every metric, plus ``best/<monitor>``.
        best_checkpoint: path of the best checkpoint (by the task's monitor), if any was written.
        run_id: the MLflow run id for a tracked single run, None in a sweep trial.
        monitor: the metric that ranked checkpoints, and its mode.
    """

    metrics: dict[str, float]
    best_checkpoint: str | None
    run_id: str | None = None
    monitor: tuple[str, str] = ("val/loss", "min")


def _scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items()
            if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}


def _fit_or_evaluate(trainer: pl.Trainer, task: BaseTask, datamodule: pl.LightningDataModule,
                     ckpt_path: str | None, checkpoint: ModelCheckpoint) -> str | None:
    """Fit, or only validate a model with nothing to train (a classical baseline such as Wiener).

    Returns:
        The best checkpoint's path.
    """
    if any(p.requires_grad for p in task.parameters()):
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path)
        return checkpoint.best_model_path or None
    trainer.validate(task, datamodule=datamodule, verbose=False)
    path = Path(checkpoint.dirpath) / "evaluated.ckpt"
    trainer.save_checkpoint(path)
    return str(path)


def _log_model_cost(client: MlflowClient, run_id: str, task: BaseTask, datamodule: pl.LightningDataModule) -> None:
    """Parameters, MACs per pixel and latency on one validation input, plus ``model_summary.txt``."""
    example = task.input_of(next(iter(datamodule.val_dataloader())))[:1].to(task.device)
    model = task.model.eval()
    cost.log_cost(client, run_id, cost.model_cost(model, example), model)


@contextlib.contextmanager
def _tracked(cfg: DictConfig) -> Iterator[tuple[MlflowClient | None, str | None]]:
    if not cfg.logger.get("enabled", True):
        yield None, None
        return
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
    tags = {"deconvlab.experiment": str(cfg.get("name")), "deconvlab.task": cfg.task._target_.rsplit(".", 1)[-1]}
    with tracking.tracked_run(cfg.logger.experiment_name, cfg.logger.run_name, uri, tags,
                              cfg.logger.get("artifact_root")) as (client, run_id):
        tracking.log_config(client, run_id, cfg)
        yield client, run_id


def checked_output_dir(cfg: DictConfig) -> Path:
    """The run's output folder, refused when the run's ``name`` (one folder of the default
    ``paths.output_dir``) is not a single folder name, e.g. ``name=../../elsewhere``.

    The name is checked whatever ``paths.output_dir`` is; an explicit ``paths.output_dir`` (a path chosen
    on purpose, such as a sweep trial's scratch folder) is used as given.

    Raises:
        UserError: a name that is not a single folder name.
    """
    name = str(cfg.get("name"))
    if Path(name).name != name or name in (".", ".."):
        raise UserError(f"run name {name!r} is not a single folder name: outputs would leave paths.root_dir",
                        "name", "use a name without '/' or '..', e.g. fcn8s_camvid")
    return Path(cfg.paths.output_dir)


def check_resume_checkpoint(task: BaseTask, ckpt_path: str | None) -> None:
    """Refuse a ``ckpt_path`` that is missing, unreadable or holds another network's weights.

    Checked before the run opens: Lightning would otherwise fail halfway into ``fit`` with an internal
    error and leave a FAILED run behind.

    Raises:
        UserError: naming the checkpoint and the first mismatching weights.
    """
    if not ckpt_path:
        return
    fix = "give a checkpoint written by a run of this experiment with the same model settings"
    try:
        # weights_only: resuming never runs code stored in a checkpoint.
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise UserError(f"cannot read the checkpoint: {first_line(exc, 300)}", f"ckpt_path={ckpt_path}",
                        fix) from None
    found = {k: tuple(v.shape) for k, v in checkpoint_model_weights(checkpoint, f"ckpt_path={ckpt_path}").items()}
    expected = {k: tuple(v.shape) for k, v in task.model.state_dict().items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise UserError(f"the checkpoint's weights do not fit this model (first difference: {differ[0]})",
                        f"ckpt_path={ckpt_path}", fix)


def train(cfg: DictConfig, callbacks: Sequence[Callback] = (),
          trainer_overrides: dict[str, Any] | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.task``; track it unless ``logger.enabled`` is false.

    Everything is instantiated before any MLflow run opens, so a config that cannot be built leaves
    no half-written run behind.

    Args:
        cfg: a config composed by :func:`deconvlab.config.compose_config`.
        callbacks: extra Lightning callbacks (a sweep trial passes Tune's reporting callback).
        trainer_overrides: Trainer arguments set by code, not config (Ray's DDP strategy in workers).

    Returns:
        The final metrics, the best checkpoint path and the MLflow run id.
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data)
    task = build_task(cfg)
    apply_perf(task, cfg.get("perf"))  # before the run opens: a missing compiler fails fast
    check_resume_checkpoint(task, cfg.get("ckpt_path"))
    checked_output_dir(cfg)  # a run name that would put outputs outside paths.root_dir
    with _tracked(cfg) as (client, run_id):
        loggers = [MLFlowLogger(tracking_uri=client.tracking_uri, run_id=run_id)] if run_id else []
        trainer, checkpoint = build_trainer(cfg, task, callbacks, loggers, trainer_overrides)
        best = _fit_or_evaluate(trainer, task, datamodule, cfg.get("ckpt_path"), checkpoint)
        metrics = _scalar_metrics(trainer)
        score = checkpoint.best_model_score if checkpoint.best_model_score is not None else metrics.get(task.monitor)
        if score is not None:
            metrics[f"best/{task.monitor}"] = float(score)
        if run_id:
            client.log_metric(run_id, f"best/{task.monitor}", metrics.get(f"best/{task.monitor}", float("nan")))
            _log_model_cost(client, run_id, task, datamodule)
            if best:
                client.log_artifact(run_id, best, "checkpoints")
                client.set_tag(run_id, "deconvlab.best_checkpoint", f"checkpoints/{Path(best).name}")
    return TrainResult(metrics, best, run_id, (task.monitor, task.monitor_mode))

