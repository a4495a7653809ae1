"""The sweep driver's record of its trials in MLflow: one parent run, one child run per trial.

:class:`MLflowSweepCallback` is the driver-side Ray Tune callback that creates and fills every trial's
child run. Everything is written from the driver process, so concurrent trials never contend for a
SQLite file, and trials on other nodes are tracked as long as their results and checkpoints reach the
driver (Ray's storage). A child run's ``config.yaml`` (and its config params) is the file the trial wrote
into its first checkpoint folder: the config it really ran, not one composed again here (only a trial that
never reported a checkpoint gets a recomposed one, tagged as such). Trials stopped early by a scheduler
(ASHA) end FINISHED with a ``deconvlab.stop_reason`` tag. The callback is pickled into Ray's experiment
state; after a restore it finds its child runs again by tag, so a resumed sweep never duplicates them. The
tags it writes and :func:`child_runs`, the query that finds the runs again, are what the leaderboard reads.

Tune runs its callbacks in its own loop, so a round trip to the store there is time no result is taken in:
metrics, params, tags, the config and checkpoint files and the end of each run go through a
:class:`~deconvlab.tracking.TrackingQueue` (a writer thread that merges what waited into one ``log_batch`` per
run, in each run's order); only creating a run (its id is needed) and an epoch's sample images (Ray may delete
that checkpoint folder once the callback returns) are written in the loop. The
queue is flushed when the experiment ends (and by the runner, :func:`deconvlab.tracking.flush_queues`,
before it reads the runs back).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from ray.tune import Callback, Checkpoint

from deconvlab import tracking
from deconvlab.errors import UserError
from deconvlab.sweep.records import (
    COMPUTE_KEY,
    EPOCHS_TAG,
    SAMPLES_DIR,
    STOP_REASON_TAG,
    TRIAL_TAG,
    DriverLog,
    child_runs,
)
from deconvlab.sweep.spec import trial_config
from deconvlab.sweep.trial_callbacks import CHECKPOINT_FILE, CONFIG_FILE, EPOCH_KEY, NODE_KEY

NODES_TAG = "deconvlab.nodes"
# Where the child run's config.yaml came from: the trial's own file, or (no checkpoint) composed again.
CONFIG_SOURCE_TAG = "deconvlab.config_source"
# Tune's bookkeeping in a result, not the trial's own numbers.
_TUNE_KEYS = {"timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration", "time_since_restore",
              "iterations_since_restore", "done", "checkpoint_dir_name"}


def _numeric(result: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()
            if k not in _TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def close_open_children(client: MlflowClient, experiment_id: str, parent_run_id: str, status: str) -> None:
    """End every child run still RUNNING (the sweep was interrupted): none is left RUNNING."""
    for run in child_runs(client, experiment_id, parent_run_id, "RUNNING"):
        client.set_tag(run.info.run_id, STOP_REASON_TAG, f"sweep ended {status.lower()} while the trial ran")
        client.set_terminated(run.info.run_id, status)


class MLflowSweepCallback(Callback):
    """Creates and fills the child run of every trial under ``parent_run_id``.

    Args:
        tracking_uri: the MLflow store.
        experiment_id: experiment holding the parent run.
        parent_run_id: the sweep's parent run.
        sweep: the sweep spec as a dict (to compose the config of a trial that reported no checkpoint).
        overrides: extra overrides given on the command line.
        max_epochs: a trial that stops before this was stopped early by the scheduler.
    """

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: dict[str, Any],
                 overrides: list[str], max_epochs: int) -> None:
        self.tracking_uri, self.experiment_id, self.parent_run_id = tracking_uri, experiment_id, parent_run_id
        self.sweep, self.overrides, self.max_epochs = sweep, list(overrides), max_epochs
        self.metric, self.mode = sweep["metric"], sweep["mode"]
        self._client: MlflowClient | None = None
        self._queue: tracking.TrackingQueue | None = None
        self.run_ids: dict[str, str] = {}
        self.best: dict[str, tuple[float, str | None]] = {}
        self.last_epoch: dict[str, int] = {}
        self.latest_is_best: dict[str, bool] = {}
        self.nodes: dict[str, list[str]] = {}
        self.stopped_by_scheduler: set[str] = set()
        self.configured: set[str] = set()  # trials whose child run has its config.yaml
        # Only a callback Ray restored (--resume) can meet a trial whose child run exists already: a fresh one
        # skips looking for it (a search per trial, the slowest call against a busy store).
        self.restored = False
        self._commit: tuple[str | None] | None = None
        # What this driver logged, for the end of the sweep (None in a restored callback: it saw only part).
        self.logged: DriverLog | None = DriverLog()

    def __getstate__(self) -> dict[str, Any]:
        # Ray pickles callbacks into its experiment state; a client with open connections does not pickle,
        # and the driver's log (every config and curve) would grow each 2 s snapshot with the sweep.
        return {**self.__dict__, "_client": None, "_queue": None, "logged": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.restored = True

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @property
    def queue(self) -> tracking.TrackingQueue:
        """Where metrics, params, tags and run ends are queued (written by a thread, merged per run)."""
        if self._queue is None:
            self._queue = tracking.TrackingQueue(self.client)
        return self._queue

    def flush(self) -> None:
        """Wait until everything queued is in the store; raise the first write that failed."""
        if self._queue is not None:
            self._queue.flush()

    def on_experiment_end(self, trials: list, **info) -> None:
        self.flush()

    def _is_better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.mode == "max" else value < than)

    def _run_for(self, trial) -> str:
        if trial.trial_id not in self.run_ids:
            existing = self.client.search_runs(
                [self.experiment_id],
                f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial.trial_id}'") \
                if self.restored else []
            if existing:  # a resumed sweep continues the trial's child run
                self.run_ids[trial.trial_id] = existing[0].info.run_id
                self._recall(trial.trial_id, existing[0].info.run_id)
            else:
                self.run_ids[trial.trial_id] = self._create_child(trial)
        return self.run_ids[trial.trial_id]

    def _recall(self, trial_id: str, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")
        history = self.client.get_metric_history(run_id, self.metric)
        for point in history:
            if self._is_better(point.value, self.best.get(trial_id, (None,))[0]):
                self.best[trial_id] = (point.value, None)
        self.last_epoch[trial_id] = max((p.step for p in history), default=0)

    def child_tags(self, trial) -> dict[str, str]:
        """The tags a trial's child run is created with (one round trip with the run itself)."""
        return {"mlflow.parentRunId": self.parent_run_id, TRIAL_TAG: trial.trial_id,
                "deconvlab.sweep": self.sweep["name"]}

    def _create_child(self, trial) -> str:
        run = self.client.create_run(self.experiment_id, run_name=f"{self.sweep['name']}-{trial.trial_id}",
                                     tags=self.child_tags(trial))
        run_id = run.info.run_id
        tracking.log_params(self.queue, run_id, {f"sampled.{k}": str(v) for k, v in trial.config.items()})
        if self.logged is not None:
            self.logged.add_run(run_id)
        return run_id

    def _log_config(self, trial, text: str | None, source: str) -> None:
        """Log ``text`` as the child run's ``config.yaml``, and its keys as params: once per trial.

        Only the first config is logged (MLflow params cannot change); a config that PBT mutates later is
        recorded by the ``hp/*`` metrics.
        """
        if text is None or trial.trial_id in self.configured:
            return
        run_id = self._run_for(trial)
        # A restored driver may not remember that it logged the config (its state is a snapshot).
        if not (self.restored and any(a.path == CONFIG_FILE for a in self.client.list_artifacts(run_id))):
            self.queue.call(run_id, self.client.log_text, run_id, text, CONFIG_FILE)
            if self.logged is not None:
                self.logged.configs[run_id] = text
            tags = {CONFIG_SOURCE_TAG: source}
            commit = self.git_commit()
            if commit:
                tags["mlflow.source.git.commit"] = commit
            tracking.log_params(self.queue, run_id, tracking.flatten(OmegaConf.create(text)), tags)
        self.configured.add(trial.trial_id)

    def git_commit(self) -> str | None:
        """The driver's checkout commit, asked of git once per sweep (not once per trial)."""
        if self._commit is None:
            self._commit = (tracking.git_commit(),)
        return self._commit[0]

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run_id = self._run_for(trial)
        epoch = int(result.get(EPOCH_KEY, result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = _numeric(result)
        if self.sweep.get("scheduler", {}).get("type") == "pbt":
            # PBT mutates a trial's hyperparameters as it goes: log them per epoch so the UI shows the schedule.
            metrics.update({f"hp/{k}": v for k, v in _numeric(trial.config).items()})
        # Queued: the metrics, and the node tag when the trial reached a new node.
        self.queue.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()],
                              tags=self._node_tags(trial.trial_id, result.get(NODE_KEY)))
        if self.logged is not None:
            for key in (self.metric, COMPUTE_KEY):  # the curves the sweep's plots draw
                if key in metrics:
                    self.logged.add_point(run_id, key, epoch, metrics[key])
        self.last_epoch[trial.trial_id] = epoch
        if result.get("done") and epoch < self.max_epochs:
            # Tune marks the result a scheduler (or stopper) stops a trial at as done; a trial that ends
            # by itself sends no done result to callbacks.
            self.stopped_by_scheduler.add(trial.trial_id)
        if result.get("checkpoint_path"):  # a multi-worker trial's checkpoint, already in Ray's storage
            self._log_config(trial, _config_in(Checkpoint(result["checkpoint_path"])), "trial")
        value = result.get(self.metric)
        improved = isinstance(value, (int, float)) and math.isfinite(value) and \
            self._is_better(float(value), self.best.get(trial.trial_id, (None,))[0])
        self.latest_is_best[trial.trial_id] = improved
        if improved:
            # Multi-worker trials report their checkpoint's path in the result; others via on_checkpoint.
            self.best[trial.trial_id] = (float(value), result.get("checkpoint_path"))

    def _node_tags(self, trial_id: str, node: str | None) -> list[RunTag]:
        """The child run's tag of every Ray node the trial ran on (more than one after a recovery), when
        ``node`` is new to it; else nothing."""
        if not node or node in self.nodes.setdefault(trial_id, []):
            return []
        self.nodes[trial_id].append(node)
        return [RunTag(NODES_TAG, ",".join(self.nodes[trial_id]))]

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        """Log the trial's config (first checkpoint) and the epoch's sample images; remember the best folder."""
        self._log_config(trial, _config_in(checkpoint), "trial")
        folder = Path(checkpoint.path)
        if (folder / SAMPLES_DIR).is_dir():
            self.client.log_artifacts(self._run_for(trial), str(folder / SAMPLES_DIR), SAMPLES_DIR)
        if self.latest_is_best.get(trial.trial_id):
            self.best[trial.trial_id] = (self.best[trial.trial_id][0], str(folder))

    def _finish(self, trial, status: str, reason: str, tags: dict[str, str] | None = None) -> None:
        run_id = self._run_for(trial)
        if trial.trial_id not in self.configured:
            # A trial that failed (or was stopped) before its first checkpoint wrote no config: the driver
            # composes it from the same overrides, and the tag says so.
            try:
                cfg = trial_config(self.sweep, trial.config, f"trials/{trial.trial_id}", self.overrides)
                self._log_config(trial, OmegaConf.to_yaml(cfg, resolve=True),
                                 "recomposed by the sweep driver: the trial reported no checkpoint")
            except UserError as exc:  # the trial's config does not even compose: that is its error
                self.client.set_tag(run_id, CONFIG_SOURCE_TAG, f"none: {exc.one_line()}"[:500])
        best = self.best.get(trial.trial_id)
        if best is not None:
            folder = best[1] or (trial.checkpoint.path if trial.checkpoint else None)
            if folder and (Path(folder) / CHECKPOINT_FILE).is_file():
                # Queued too: a finished trial's kept checkpoints stay in Ray's storage (Tune deletes one only
                # when the same trial saves a better one).
                self.queue.call(run_id, self.client.log_artifact, run_id, str(Path(folder) / CHECKPOINT_FILE),
                                "checkpoints")
        # Queued: the best value and the closing tags, then the status, once all the run's results are in.
        tags = {**(tags or {}), EPOCHS_TAG: str(self.last_epoch.get(trial.trial_id, 0)), STOP_REASON_TAG: reason}
        metrics = [] if best is None else [Metric(f"best/{self.metric}", best[0], int(time.time() * 1000), 0)]
        self.queue.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        self.queue.terminate(run_id, status)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        epochs = self.last_epoch.get(trial.trial_id, 0)
        if trial.trial_id in self.stopped_by_scheduler:
            reason = f"stopped early by the scheduler after epoch {epochs}"
        elif epochs >= self.max_epochs:
            reason = "completed"
        else:
            reason = f"ended by itself after epoch {epochs} of {self.max_epochs}"
        self._finish(trial, "FINISHED", reason)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self.queue.log_batch(self._run_for(trial),
                             tags=[RunTag("deconvlab.recovered", f"restarted from a checkpoint at {time.ctime()}")])

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        error = _trial_error(trial)
        last = error.strip().splitlines()[-1][:200] if error.strip() else "error"
        self._finish(trial, "FAILED", f"failed: {last}", {"error": error[:5000]})


def _config_in(checkpoint: Checkpoint) -> str | None:
    """The ``config.yaml`` a trial wrote into a checkpoint folder (local or on remote storage), if any."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{CONFIG_FILE}") as stream:
            return stream.read().decode()
    except OSError:  # FileNotFoundError included: a checkpoint written before trials wrote their config
        return None


def _trial_error(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text() if path else "unknown error"
    except OSError:
        return f"error file {path} unreadable"
