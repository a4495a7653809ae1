"""The build floor: a composed config -> model, task, data module and trainer; a task rebuilt from weights.

Everything that turns configuration into objects goes through here: ``train`` (a run and a sweep trial),
``cost`` (measuring a trial's model), ``model_io`` (packaging and loading a promoted model),
``evaluate`` and ``predict``. One data-module builder means one error policy: a problem with the data is
one :class:`~deconvlab.errors.UserError` naming ``data.root``, wherever the data is read from.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from deconvlab.callbacks import SampleImages, TrainingCompute
from deconvlab.errors import UserError, first_line, user_error_in
from deconvlab.models import list_models
from deconvlab.tasks.base import BaseTask

DATA_FIX = "check data.root (a folder laid out like the data set) and data.split"
TRUST_FIX = "pass --trust only if you trust where this model came from"


# -- from a config ---------------------------------------------------------------------------------------
def build_task(cfg: DictConfig) -> BaseTask:
    """Instantiate the model, the optimiser factory and the task around them."""
    model = instantiate(cfg.model)
    optimizer = instantiate(cfg.optim)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    # Plain containers (not DictConfig) in hparams keep checkpoints loadable with weights_only=True.
    return instantiate(cfg.task, model=model, optimizer=optimizer, scheduler=scheduler, _convert_="all")


def task_family(cfg: DictConfig) -> str:
    """The task family a config trains (``restoration``, ``segmentation``...), without building anything.

    A task class declares its ``family``; a task factory that picks the task by the model (e.g.
    ``tasks.localisation.task_for_model``) trains the family the model catalogue lists for the model.

    Raises:
        UserError: neither the task nor the model says which family it is.
    """
    target = str(cfg.task._target_)
    task = _locate(target)
    if task is None:
        family = None
    else:
        family = getattr(task, "family", None) if isinstance(task, type) else _catalogue_family(cfg)
    if family is None:
        raise UserError(f"unknown task {target}", "task._target_",
                        "use one of the deconvlab.tasks classes, or a model from conf/model")
    return family


def _locate(target: str) -> Any:
    """The object a ``_target_`` names, or None (quietly: Hydra's own locator logs an ERROR line)."""
    module, _, name = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except (ImportError, ValueError):
        return None


def _catalogue_family(cfg: DictConfig) -> str | None:
    model_target = str(cfg.model.get("_target_"))
    return next((spec.family for spec in list_models() if spec.target == model_target), None)


def build_datamodule(data: DictConfig | Mapping[str, Any], stage: str | None = None,
                     purpose: str = "the data") -> pl.LightningDataModule:
    """Instantiate a data module from its config and, when ``stage`` is given, set it up for that stage.

    Args:
        data: the ``data`` section of a composed config (a DictConfig or a resolved dict).
        stage: ``fit``, ``validate``... to read the data now; None leaves it to Lightning.
        purpose: what the data is for, in the error message (e.g. "the evaluation data").

    Raises:
        UserError: the data's own user error (a missing folder, a damaged file), or any other failure to
            read it, as one line naming ``data.root``.
    """
    try:
        datamodule = instantiate(data)
        if stage is not None:
            datamodule.setup(stage)
    except (InstantiationException, OSError, ValueError) as exc:
        known = user_error_in(exc)
        if known is not None:
            raise known from None
        raise UserError(f"cannot load {purpose}: {first_line(exc.__cause__ or exc, 1000)}",
                        f"data.root={data.get('root')}", DATA_FIX) from None
    return datamodule


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """The Lightning callbacks chosen in config (``callbacks=[early_stopping,lr_monitor]``, conf/callbacks/),
    built before a run opens so a bad one leaves no run behind.

    Raises:
        UserError: ``trainer.callbacks`` set (the platform passes the trainer its own list; a value there
            would be dropped without a word), or a callback that cannot be built.
    """
    if "callbacks" in cfg.trainer:
        raise UserError("trainer.callbacks would be replaced by the platform's callbacks", "trainer.callbacks",
                        "choose callbacks with callbacks=[early_stopping,lr_monitor] (conf/callbacks/) or add one "
                        "with +callbacks.NAME={_target_:pytorch_lightning.callbacks.ClassName}")
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        try:
            callback = instantiate(node)
        except InstantiationException as exc:
            raise UserError(f"callback {name!r} cannot be built: {first_line(exc.__cause__ or exc, 500)}",
                            f"callbacks.{name}", "fix its arguments (deconvlab train --cfg job shows them)") from None
        if not isinstance(callback, Callback):
            raise UserError(f"callbacks.{name} builds a {type(callback).__name__}, not a Lightning Callback",
                            f"callbacks.{name}._target_", "point _target_ at a pytorch_lightning.Callback class")
        built.append(callback)
    return built


def build_trainer(cfg: DictConfig, task: BaseTask, callbacks: Sequence[Callback],
                  loggers: Sequence[pl.loggers.Logger],
                  trainer_overrides: dict[str, Any] | None = None) -> tuple[pl.Trainer, ModelCheckpoint]:
    """The Lightning Trainer from ``cfg.trainer`` plus the platform's callbacks: best/last checkpoints, sample
    images, and the cumulative training compute (``compute/*`` metrics per epoch, see ``TrainingCompute``)."""
    output_dir = Path(cfg.paths.output_dir)
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best-epoch{epoch:03d}",
                                 monitor=task.monitor, mode=task.monitor_mode, save_top_k=1,
                                 auto_insert_metric_name=False)
    # last.ckpt, the resume point, must be the latest epoch. ModelCheckpoint(save_last=True) writes it only in a
    # step that also saved a top-k checkpoint since Lightning 2.6, i.e. it is a copy of the best one, and a
    # resume from it silently repeats every epoch after the best. One unmonitored checkpoint, overwritten at
    # every save, is the latest.
    latest = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last", save_top_k=1,
                             enable_version_counter=False)
    trainer = instantiate(cfg.trainer, default_root_dir=str(output_dir), logger=list(loggers) or False,
                          callbacks=[checkpoint, latest, SampleImages(), TrainingCompute(), *callbacks],
                          **(trainer_overrides or {}))
    return trainer, checkpoint


# -- from weights ----------------------------------------------------------------------------------------
def read_weights(path: str | Path, trust: bool = False) -> Any:
    """``torch.load`` a weights or checkpoint file; only tensors and plain containers unless ``trust``.

    Raises:
        UserError: the file holds pickled objects (and ``trust`` is off), or it is not a torch file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        first = first_line(exc)
        raise UserError(f"{Path(path).name} contains pickled objects that a safe load refuses ({first})",
                        str(path), TRUST_FIX) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"cannot read weights file {Path(path).name}: {str(exc).strip()[:200]}", str(path),
                        "the file is damaged or not a PyTorch checkpoint; promote the run again") from None


def checkpoint_model_weights(checkpoint: Any, where: str) -> dict[str, torch.Tensor]:
    """The network's weights out of a Lightning checkpoint (the task's ``model.`` entries)."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError("the checkpoint has no state_dict", where,
                        "use a Lightning checkpoint of a deconvlab run")
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if not weights:
        raise UserError("the checkpoint holds no model.* weights", where,
                        "use a checkpoint of a deconvlab task")
    return weights


def rebuild_task(cfg: DictConfig, weights: dict[str, torch.Tensor], where: str) -> BaseTask:
    """Build the task and network from ``cfg`` (deconvlab's classes) and load ``weights`` into it."""
    task = build_task(cfg)
    try:
        task.model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = first_line(exc, 500)
        raise UserError(f"the weights do not fit the model built from its config: {first}", where,
                        "the config and weights come from different runs; promote the run again") from None
    return task.eval()
