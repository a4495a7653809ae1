"""``deconvlab evaluate``: a model URI on its validation split, or on data chosen by Hydra overrides.

The network and the task come from the model's own resolved config. Only the data may change: with no
overrides the model is evaluated on exactly the data config it was trained with; ``data.split=test``,
``data.root=/held/out/set`` or ``data=camvid`` recompose the run's config with those overrides and take
its data section (switching the data group drops the run's own ``data.*`` overrides, which were for the
other data set). Metric names carry the split they were read from: ``val/psnr`` on the validation split
(the same key as the run's own), ``test/psnr`` with ``data.split=test``, so a test figure is never
mistaken for a validation one. Every evaluation with a result is logged as a run of the ``evaluations`` experiment,
tagged with the model URI, the registered name and version, and linked from the version.

Per-item results (``--per-item FILE.csv``): the task records one row per image (per case for volumes),
its id and every per-item metric under its logged key; the file is also the run's ``per_item.csv``. Each
logged metric is the mean of its column, or pooled over the split, as ``task.item_aggregates()`` says.
"""

from __future__ import annotations

import csv
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from deconvlab import tracking
from deconvlab.build import DATA_FIX, build_datamodule
from deconvlab.config import compose_config
from deconvlab.errors import UserError, first_line
from deconvlab.model_io import LoadedModel, load_model, quiet_logger
from deconvlab.store import client_for, set_version_tag_if_allowed
from deconvlab.volume.report import log_table

EVALUATION_EXPERIMENT = "evaluations"
PER_ITEM_ARTIFACT = "per_item.csv"
# Tasks log their evaluation metrics under val/ whatever split their val loader reads.
TASK_PREFIX = "val/"
VALIDATION_SPLITS = {"val", "valid", "validation"}


@dataclass
class Evaluation:
    """The metrics of one evaluation and where they were logged.

    Attributes:
        items: one row per image or case (``item`` then each per-item metric), when asked for.
        aggregates: per metric key of ``items``: ``mean`` (the logged value is the mean of the column) or
            ``pooled`` (computed from counts summed over the split).
        per_item_file: where ``items`` were written.
    """

    uri: str
    metrics: dict[str, float]
    data: dict[str, Any]
    run_id: str | None = None
    name: str | None = None
    version: str | None = None
    overrides: list[str] = field(default_factory=list)
    items: list[dict[str, Any]] | None = None
    aggregates: dict[str, str] = field(default_factory=dict)
    per_item_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model_uri": self.uri, "registered_model": self.name, "version": self.version,
                "split": self.data.get("split"), "data_root": self.data.get("root"),
                "overrides": self.overrides, "metrics": self.metrics, "evaluation_run_id": self.run_id,
                "per_item_file": self.per_item_file, "per_item_aggregates": self.aggregates or None}


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _is_data_override(override: str) -> bool:
    return "=" in override and (_key(override) == "data" or _key(override).startswith("data."))


def evaluation_data(cfg: DictConfig, overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved data config to evaluate on: the model's own, or recomposed with ``overrides``.

    Raises:
        UserError: an override that is not about data (the model is fixed by the URI), or one that does
            not compose.
    """
    others = [o for o in overrides if not _is_data_override(o)]
    if others:
        raise UserError(f"evaluate takes data overrides only, got {' '.join(others)}", " ".join(others),
                        "the model is fixed by its URI; override data=..., data.root=..., data.split=...")
    if not overrides:
        return OmegaConf.to_container(cfg.data, resolve=True)
    base = cfg.get("overrides")
    if base is None:
        raise UserError("this model's config does not record the overrides it was composed from",
                        " ".join(overrides), "evaluate it without overrides, or promote a newer run")
    if any(_key(o) == "data" for o in overrides):
        # Another data set: the run's own data.* settings were for the old one and may not even exist.
        base = [o for o in base if not _is_data_override(o)]
    composed = compose_config([*base, *overrides])
    return OmegaConf.to_container(composed.data, resolve=True)


def split_key(key: str, split: Any) -> str:
    """``val/psnr`` read from split ``test`` -> ``test/psnr``; validation splits keep ``val/``."""
    if split is None or str(split) in VALIDATION_SPLITS or not key.startswith(TASK_PREFIX):
        return key
    return f"{split}/{key.removeprefix(TASK_PREFIX)}"


def _accelerator(cfg: DictConfig) -> str:
    """The run's own accelerator setting (the numerics it was scored with); CPU if its GPU is missing here."""
    wanted = str(cfg.trainer.get("accelerator", "auto"))
    return "cpu" if wanted in ("gpu", "cuda") and not torch.cuda.is_available() else wanted


def run_validation(loaded: LoadedModel, datamodule, record_items: bool = False) -> dict[str, float]:
    """The task's validation loop over the whole split; returns its scalar metrics.

    With ``record_items`` the task also keeps one row per item (read them with :func:`item_results`).
    """
    loaded.task.record_items = record_items
    try:
        # Lightning's banners (accelerator, tips) would interleave with the metrics or the JSON.
        with quiet_logger("pytorch_lightning"):
            trainer = pl.Trainer(accelerator=_accelerator(loaded.cfg), devices=1, logger=False,
                                 enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0,
                                 precision=loaded.cfg.trainer.get("precision", "32-true"))
            (results,) = trainer.validate(loaded.task, datamodule=datamodule, verbose=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"evaluation failed on the data: {first_line(exc, 1000)}", "data",
                        DATA_FIX) from None
    return {k: float(v) for k, v in sorted(results.items())}


def item_results(task) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The per-item rows the task recorded in its last validation, and how each key is aggregated.

    Raises:
        UserError: the task records no per-item results, or recorded none (an empty split).
    """
    rows = getattr(task, "item_rows", None)
    if rows is None or not hasattr(task, "item_aggregates"):
        raise UserError(f"the {task.family} task does not record per-item results", "--per-item",
                        "evaluate without --per-item")
    if not rows:
        raise UserError(f"the {task.family} task recorded no per-item rows on this data", "--per-item",
                        "check that the split has items (data.root, data.split); volumes are scored per case "
                        "only where the task evaluates whole volumes")
    return [dict(row) for row in rows], dict(task.item_aggregates())


def write_items(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write per-item rows as CSV at full precision (``item`` first, then every key in first-seen order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _log_volume_report(client, run_id: str, task) -> None:
    """A volumetric task's per-case table (Dice, sensitivity, HD95 per region) and contour overlays."""
    rows = getattr(task, "volume_rows", None)
    if not rows:
        return
    log_table(client, run_id, rows, "per_case.csv")
    tracking.log_images(client, run_id, task.volume_overlays, "volume")


def _log(evaluation: Evaluation, loaded: LoadedModel, tracking_uri: str | None) -> str:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tags = {"deconvlab.role": "evaluation", "deconvlab.model_uri": loaded.uri,
            "deconvlab.source_run_id": loaded.run_id or "",
            "deconvlab.split": str(evaluation.data.get("split")),
            "deconvlab.data_root": str(evaluation.data.get("root"))}
    if loaded.name:
        tags |= {"deconvlab.registered_model": loaded.name, "deconvlab.model_version": str(loaded.version)}
    label = (f"{loaded.name} v{loaded.version}" if loaded.name
             else f"run {loaded.run_id[:8]}" if loaded.run_id else Path(loaded.uri).name)
    run_name = f"eval {label} {evaluation.data.get('split')} {time.strftime('%Y%m%d-%H%M%S')}"
    with tracking.tracked_run(EVALUATION_EXPERIMENT, run_name, uri, tags) as (client, run_id):
        tracking.log_params(client, run_id, {**tracking.flatten(evaluation.data, "data."),
                                             "eval.overrides": " ".join(evaluation.overrides)})
        for key, value in evaluation.metrics.items():
            client.log_metric(run_id, key, value)
        _log_volume_report(client, run_id, loaded.task)
        if evaluation.items:
            with tempfile.TemporaryDirectory() as scratch:
                client.log_artifact(run_id, str(write_items(evaluation.items, Path(scratch) / PER_ITEM_ARTIFACT)))
    if loaded.name:
        # A reader may evaluate a model it cannot tag: the evaluation run still records the link.
        set_version_tag_if_allowed(client_for(uri), loaded.name, loaded.version, "deconvlab.last_evaluation_run",
                                   run_id)
    return run_id


def evaluate(uri: str, overrides: Sequence[str] = (), tracking_uri: str | None = None, trust: bool = False,
             log: bool = True, per_item: str | Path | None = None, config: str | Path | None = None) -> Evaluation:
    """Evaluate the model behind ``uri`` with its task's validation metrics.

    Args:
        uri: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID`` or a ``.ckpt`` file.
        overrides: data overrides (``data.split=test data.root=...``); none = the model's validation data.
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI`` or ./mlflow.db).
        trust: allow unpickling (see :func:`deconvlab.model_io.load_model`).
        log: log an evaluation run (nothing is logged when the evaluation fails).
        per_item: write one row per item (its id and every per-item metric) to this CSV file; it is also
            logged as the run's ``per_item.csv``.
        config: the config of a ``.ckpt`` file, when none is found beside it (see ``load_model``).

    Returns:
        The metrics (``val/...`` keys as in training, ``<split>/...`` for another split such as ``test``),
        the per-item rows if asked, the evaluation run id.
    """
    overrides = list(overrides)
    loaded = load_model(uri, tracking_uri, trust, config)
    data = evaluation_data(loaded.cfg, overrides)
    datamodule = build_datamodule(data, "validate", "the evaluation data")
    split = data.get("split")
    metrics = {split_key(k, split): v for k, v in run_validation(loaded, datamodule, per_item is not None).items()}
    evaluation = Evaluation(uri, metrics, data, None, loaded.name, loaded.version, overrides)
    if per_item is not None:
        items, aggregates = item_results(loaded.task)
        evaluation.items = [{split_key(k, split): v for k, v in row.items()} for row in items]
        evaluation.aggregates = {split_key(k, split): v for k, v in aggregates.items()}
        evaluation.per_item_file = str(write_items(evaluation.items, per_item))
    if log:
        evaluation.run_id = _log(evaluation, loaded, tracking_uri)
    return evaluation


def format_metrics(evaluation: Evaluation) -> list[str]:
    """Human-readable lines: what was evaluated on which data, then one metric per line."""
    what = f"{evaluation.name} version {evaluation.version}" if evaluation.name else evaluation.uri
    lines = [f"{what} on split {evaluation.data.get('split')} (root={evaluation.data.get('root')})"]
    width = max((len(k) for k in evaluation.metrics), default=0)
    lines += [f"  {k:<{width}}  {v:.6g}" for k, v in evaluation.metrics.items()]
    if evaluation.per_item_file:
        lines.append(f"{len(evaluation.items or [])} items written to {evaluation.per_item_file}")
    if evaluation.run_id:
        lines.append(f"logged as run {evaluation.run_id} in experiment {EVALUATION_EXPERIMENT}")
    return lines
