"""``train(cfg)``: the one code path for a single run and for a sweep trial.

A single run (``deconvlab train``) opens its own MLflow run here. A sweep trial composes the same
config with ``logger.enabled=false`` and passes Tune's reporting callback in ``callbacks``: the sweep
driver then logs the trial's child run, so trials never write to the tracking store themselves.

:func:`rerun_config` turns a tracked run's (or trial's) logged ``config.yaml`` back into a config for
``deconvlab train --from-run RUN_ID``.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger

from deconvlab import cost, tracking
from deconvlab.access import redact
from deconvlab.build import build_callbacks, build_datamodule, build_task, build_trainer, checkpoint_model_weights
from deconvlab.callbacks import RUN_LOGGER, EpochLog, ReleaseInterruptedReads, training_compute
from deconvlab.config import compose_config, config_groups
from deconvlab.errors import UserError, first_line
from deconvlab.perf import apply_perf
from deconvlab.store import CONFIG_FILE, client_for, get_run, resolve_run_id, run_config
from deconvlab.tasks.base import BaseTask

RERUN_TAG = "deconvlab.rerun_of"
# A run's record in its output folder (run_files), next to CONFIG_FILE, the name tracked runs log it under.
OVERRIDES_FILE, LOG_FILE = "overrides.yaml", "train.log"


@dataclass
class TrainResult:
    """What a finished run returns.

    Attributes:
        metrics: the last logged value of every metric, plus ``best/<monitor>`` and ``compute/*``.
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
def _tracked(cfg: DictConfig, extra_tags: Mapping[str, str]) -> Iterator[tuple[MlflowClient | None, str | None]]:
    if not cfg.logger.get("enabled", True):
        yield None, None
        return
    uri = tracking.resolve_tracking_uri(cfg.logger.get("tracking_uri"))
    tags = {"deconvlab.experiment": str(cfg.get("name")), "deconvlab.task": cfg.task._target_.rsplit(".", 1)[-1],
            **extra_tags}
    with tracking.tracked_run(cfg.logger.experiment_name, cfg.logger.run_name, uri, tags,
                              cfg.logger.get("artifact_root")) as (client, run_id):
        tracking.log_config(client, run_id, cfg)
        yield client, run_id


@contextlib.contextmanager
def run_files(cfg: DictConfig, output_dir: Path, run_id: str | None) -> Iterator[logging.Logger]:
    """The run's own record in its output folder, tracked or not (as Hydra's ``.hydra/`` and ``train.log``):
    ``config.yaml`` (resolved, credentials redacted; what ``evaluate``/``predict`` read beside a ``.ckpt``),
    ``overrides.yaml`` (the command line's overrides) and ``train.log`` (start, one line per epoch, result).

    A run that fails or is interrupted keeps the promise of docs/reliability.md instead: no partial file
    is left (the error is on the terminal and in the tracked run's ``error`` tag), so the record goes too.

    Yields:
        The run's logger; its lines go to ``train.log`` only, not to the terminal.
    """
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    record = [output_dir / name for name in (CONFIG_FILE, OVERRIDES_FILE, LOG_FILE)]
    (output_dir / CONFIG_FILE).write_text(redact(OmegaConf.to_yaml(cfg, resolve=True)))
    overrides = list(cfg.get("overrides") or [])
    (output_dir / OVERRIDES_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
    log = logging.getLogger(RUN_LOGGER)
    handler = logging.FileHandler(output_dir / LOG_FILE)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    previous_level, log.propagate = log.level, False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    log.info("run %s of %s: overrides %s, tracked run %s", cfg.get("name"), cfg.task._target_, " ".join(overrides),
             run_id or "none (logger disabled)")
    failed = True
    try:
        yield log
        failed = False
    finally:
        log.removeHandler(handler)
        handler.close()
        log.setLevel(previous_level)
        if failed:
            for path in record:
                path.unlink(missing_ok=True)
            if created and not any(output_dir.iterdir()):
                output_dir.rmdir()


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
          trainer_overrides: dict[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` with ``cfg.task``; track it unless ``logger.enabled`` is false.

    Everything is instantiated before any MLflow run opens, so a config that cannot be built leaves
    no half-written run behind.

    Args:
        cfg: a config composed by :func:`deconvlab.config.compose_config`.
        callbacks: extra Lightning callbacks (a sweep trial passes Tune's reporting callback).
        trainer_overrides: Trainer arguments set by code, not config (Ray's DDP strategy in workers).
        tags: extra tags of the tracked run (a re-run's ``deconvlab.rerun_of``).

    Returns:
        The final metrics, the best checkpoint path and the MLflow run id.
    """
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build_datamodule(cfg.data)
    task = build_task(cfg)
    apply_perf(task, cfg.get("perf"))  # before the run opens: a missing compiler fails fast
    check_resume_checkpoint(task, cfg.get("ckpt_path"))
    chosen_callbacks = build_callbacks(cfg)  # conf/callbacks/: built before the run opens
    output_dir = checked_output_dir(cfg)  # a run name that would put outputs outside paths.root_dir
    with _tracked(cfg, tags or {}) as (client, run_id), run_files(cfg, output_dir, run_id) as log:
        loggers = [MLFlowLogger(tracking_uri=client.tracking_uri, run_id=run_id)] if run_id else []
        all_callbacks = [*chosen_callbacks, *callbacks, EpochLog(), ReleaseInterruptedReads()]
        trainer, checkpoint = build_trainer(cfg, task, all_callbacks, loggers, trainer_overrides)
        best = _fit_or_evaluate(trainer, task, datamodule, cfg.get("ckpt_path"), checkpoint)
        metrics = {**_scalar_metrics(trainer), **training_compute(trainer)}
        score = checkpoint.best_model_score if checkpoint.best_model_score is not None else metrics.get(task.monitor)
        if score is not None:
            metrics[f"best/{task.monitor}"] = float(score)
        if run_id:
            client.log_metric(run_id, f"best/{task.monitor}", metrics.get(f"best/{task.monitor}", float("nan")))
            _log_model_cost(client, run_id, task, datamodule)
            if best:
                client.log_artifact(run_id, best, "checkpoints")
                client.set_tag(run_id, "deconvlab.best_checkpoint", f"checkpoints/{Path(best).name}")
        log.info("best %s = %s, checkpoint %s", task.monitor, metrics.get(f"best/{task.monitor}"), best)
    return TrainResult(metrics, best, run_id, (task.monitor, task.monitor_mode))



# -- running a tracked run again -------------------------------------------------------------------------
def rerun_config(run_id: str, overrides: Sequence[str] = ()) -> tuple[DictConfig, dict[str, str]]:
    """The config to train ``run_id`` again: its logged ``config.yaml`` with ``overrides`` on top.

    The logged file is the resolved config the run (or sweep trial) ran, so the re-run gets the same values,
    seed included, whatever ``conf/`` says today. What belonged to the old run is set afresh: a new output
    folder (values under the old one now point into it), tracking as a normal run in the current store (a
    trial's config has ``logger=none``) named ``rerun-of-<its name>``, and for a trial no ``ckpt_path`` (that
    was the Ray checkpoint a restarted trial resumed from). ``overrides`` are applied with Hydra's syntax
    (``key=value``, ``+key=value``, ``++key=value``, ``~key``) to the logged values; a config group choice
    (``model=...``) cannot be applied to a resolved config and is refused.

    Returns:
        The config, and the new run's tags (``deconvlab.rerun_of``).

    Raises:
        UserError: an unknown run, a run without ``config.yaml``, or an override that does not apply.
    """
    client = client_for()
    run_id = resolve_run_id(client, run_id)  # a prefix names its run; the rerun tag records the full id
    run = get_run(client, run_id)
    logged = OmegaConf.to_container(run_config(client, run_id))
    fresh = compose_config([])
    was_trial = logged.get("logger", {}).get("enabled") is False
    recorded = [o for o in logged.get("overrides") or [] if not _sets_run_local_key(o)]
    logged = _redirect(logged, str(logged.get("paths", {}).get("output_dir") or ""), "${paths.output_dir}")
    # Unresolved: the new run's store (MLFLOW_TRACKING_URI) and a new ${now:...} output folder.
    paths = OmegaConf.to_container(fresh.paths)
    logged["logger"] = {**OmegaConf.to_container(fresh.logger), "run_name": f"rerun-of-{run.info.run_name}"}
    logged["paths"] = {**logged.get("paths", {}), "root_dir": paths["root_dir"], "output_dir": paths["output_dir"]}
    if was_trial:
        logged["ckpt_path"] = None
    cfg = OmegaConf.create(logged)
    apply_overrides(cfg, overrides, recorded)
    with open_dict(cfg):
        cfg.overrides = [*recorded, *overrides]
    return cfg, {RERUN_TAG: run_id}


def _sets_run_local_key(override: str) -> bool:
    """Whether an override sets what a re-run sets afresh: tracking, the output folder, a resume point."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split(".", 1)[0] == "logger" or key in ("paths.output_dir", "ckpt_path")


def _redirect(node: Any, old: str, new: str) -> Any:
    """Every string of a config container that is ``old`` (the old run's folder) or under it, moved to ``new``."""
    if isinstance(node, dict):
        return {k: _redirect(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_redirect(v, old, new) for v in node]
    inside = isinstance(node, str) and old and (node == old or node.startswith(old.rstrip("/") + "/"))
    return new + node[len(old):] if inside else node


_ABSENT = object()


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], recorded: Sequence[str] = ()) -> None:
    """Apply Hydra overrides to a composed (or logged) config in place, as Hydra applies them to values.

    Args:
        cfg: the config; set to struct mode, so a misspelt key is an error, not a new key.
        overrides: ``key=value``, ``+key=value`` (a new key), ``++key=value`` (either), ``~key`` (delete).
        recorded: the overrides the config was composed with, for the advice on a group choice.

    Raises:
        UserError: unreadable overrides, a group choice, an unknown key, an existing ``+key``, a wrong type.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise UserError(f"cannot read the overrides: {first_line(exc)}", " ".join(overrides),
                        "write key=value, +key=value or ~key") from None
    groups = set(config_groups())
    OmegaConf.set_struct(cfg, True)
    for override in parsed:
        key, line, value = override.key_or_group, override.input_line, override.value()
        if override.package is not None or key in groups or override.is_sweep_override():
            raise UserError(f"{line} chooses a config group, which a re-run cannot apply to the logged, resolved "
                            "config", line, f"set single keys ({key}.NAME=VALUE), or train anew: deconvlab train "
                            f"{' '.join([*recorded, line])}")
        old = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if override.is_delete():
            if old is _ABSENT:
                raise UserError(f"cannot delete {key}: the config has no such key", line, "check the spelling")
            parent, _, leaf = key.rpartition(".")
            with open_dict(cfg):
                del (OmegaConf.select(cfg, parent) if parent else cfg)[leaf]
            continue
        if override.is_add() and old is not _ABSENT and not isinstance(value, (dict, list)):
            raise UserError(f"{key} is already set ({old!r})", line, f"drop the +: {line[1:]}")
        if not (override.is_add() or override.is_force_add()):
            if old is _ABSENT:
                raise UserError(f"unknown config key {key!r}", key, f"check the spelling, or add it with +{line}")
            _check_type(key, old, value)
        OmegaConf.update(cfg, key, value, merge=True, force_add=override.is_add() or override.is_force_add())


def _check_type(key: str, old: Any, new: Any) -> None:
    """A scalar override keeps the logged value's type (an int where a float was is fine)."""
    scalars = (bool, int, float, str)
    if not isinstance(old, scalars) or not isinstance(new, scalars) or type(old) is type(new):
        return
    if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
        return
    raise UserError(f"{key}={new!r} has the wrong type", key, f"expected {type(old).__name__} like {old!r}")
