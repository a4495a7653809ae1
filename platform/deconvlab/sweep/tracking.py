"""Driver-side MLflow logging of a sweep: one parent run, one child run per trial, a leaderboard.

Everything is written from the driver process, so concurrent trials never contend for a SQLite file
and trials on other nodes are tracked as long as their checkpoints reach the sweep's storage.
Trials stopped early by a scheduler (ASHA) end FINISHED with a ``deconvlab.stop_reason`` tag.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from deconvlab import tracking
from deconvlab.sweep.trial import CHECKPOINT_FILE, EPOCH_KEY, SAMPLES_DIR

CHILD_TAG = "deconvlab.trial_id"
STOP_REASON_TAG = "deconvlab.stop_reason"


def _numeric(result: dict[str, Any]) -> dict[str, float]:
    """The metrics of a Tune result worth logging: the trial's own numbers, not Tune's bookkeeping."""
    skip = {"timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration", "time_since_restore",
            "iterations_since_restore", "done"}
    return {k: float(v) for k, v in result.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MLflowSweepCallback(Callback):
    """Creates and fills the child run of every trial under ``parent_run_id``.

    Args:
        client: MLflow client of the tracking store.
        experiment_id: experiment holding the parent run.
        parent_run_id: the sweep's parent run.
        sweep_name: used in run names.
        metric, mode: the sweep's ranking metric (picks each trial's best checkpoint).
        max_epochs: a trial that stops before this was stopped early by the scheduler.
        trial_config: ``(trial) -> composed DictConfig`` of that trial, for its params and config.yaml.
    """

    def __init__(self, client: MlflowClient, experiment_id: str, parent_run_id: str, sweep_name: str,
                 metric: str, mode: str, max_epochs: int, trial_config: Callable[[Any], Any]) -> None:
        self.client, self.experiment_id, self.parent_run_id = client, experiment_id, parent_run_id
        self.sweep_name, self.metric, self.mode, self.max_epochs = sweep_name, metric, mode, max_epochs
        self.trial_config = trial_config
        self.run_ids: dict[str, str] = {}
        self.best: dict[str, tuple[float, str | None]] = {}
        self.last_epoch: dict[str, int] = {}
        self.latest_is_best: dict[str, bool] = {}
        self.outcome: dict[str, str] = {}

    def _run_for(self, trial) -> str:
        if trial.trial_id in self.run_ids:
            return self.run_ids[trial.trial_id]
        existing = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.{CHILD_TAG} = '{trial.trial_id}'")
        if existing:  # a resumed sweep continues the trial's child run instead of duplicating it
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self._create_child(trial)
        self.run_ids[trial.trial_id] = run_id
        return run_id

    def _create_child(self, trial) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{self.sweep_name}-{trial.trial_id}",
                                     tags={"mlflow.parentRunId": self.parent_run_id, CHILD_TAG: trial.trial_id,
                                           "deconvlab.sweep": self.sweep_name})
        run_id = run.info.run_id
        tracking.log_config(self.client, run_id, self.trial_config(trial))
        tracking.log_params(self.client, run_id, {f"sampled.{k}": str(v) for k, v in trial.config.items()})
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run_id = self._run_for(trial)
        epoch = int(result.get(EPOCH_KEY, result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in _numeric(result).items()])
        self.last_epoch[trial.trial_id] = epoch
        value = result.get(self.metric)
        best = self.best.get(trial.trial_id)
        improved = isinstance(value, (int, float)) and math.isfinite(value) and (
            best is None or (value > best[0] if self.mode == "max" else value < best[0]))
        self.latest_is_best[trial.trial_id] = improved
        if improved:
            # Multi-worker trials report their checkpoint's path in the result; others via on_checkpoint.
            self.best[trial.trial_id] = (float(value), result.get("checkpoint_path"))

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        """Log the epoch's sample images; remember the folder of the best checkpoint."""
        folder = Path(checkpoint.path)
        if (folder / SAMPLES_DIR).is_dir():
            self.client.log_artifacts(self._run_for(trial), str(folder / SAMPLES_DIR), SAMPLES_DIR)
        if self.latest_is_best.get(trial.trial_id):
            self.best[trial.trial_id] = (self.best[trial.trial_id][0], str(folder))

    def _finish(self, trial, status: str, reason: str) -> None:
        run_id = self._run_for(trial)
        best = self.best.get(trial.trial_id)
        if best is not None:
            self.client.log_metric(run_id, f"best/{self.metric}", best[0])
            checkpoint = Path(best[1]) / CHECKPOINT_FILE if best[1] else None
            if checkpoint is not None and checkpoint.is_file():
                self.client.log_artifact(run_id, str(checkpoint), "checkpoints")
        self.client.set_tag(run_id, STOP_REASON_TAG, reason)
        self.client.set_terminated(run_id, status)
        self.outcome[trial.trial_id] = "early stopped" if reason.startswith("stopped early") else status.lower()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        epochs = self.last_epoch.get(trial.trial_id, 0)
        reason = "completed" if epochs >= self.max_epochs else f"stopped early by the scheduler after epoch {epochs}"
        self._finish(trial, "FINISHED", reason)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = _trial_error(trial)
        self.client.set_tag(self._run_for(trial), "error", error[:5000])
        self._finish(trial, "FAILED", f"failed: {error.strip().splitlines()[-1][:200] if error.strip() else 'error'}")


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text() if path else "unknown error"
    except OSError:
        return f"error file {path} unreadable"
