"""``run_sweep``: a sweep file -> a Ray Tune Tuner, a parent MLflow run, a leaderboard; ``--resume``."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow.fs
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune import ResultGrid
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
from ray.tune.stopper import Stopper

from deconvlab import tracking
from deconvlab.config import compose_config
from deconvlab.errors import UserError, first_line
from deconvlab.sweep.child_runs import close_open_children
from deconvlab.sweep.progress import TrialProgressLines
from deconvlab.sweep.records import DriverLog
from deconvlab.sweep.repeats import RepeatsSweepCallback, param_space, search_settings
from deconvlab.sweep.spec import SweepSpec, load_sweep, validate
from deconvlab.sweep.trial import run_trial
from deconvlab.sweep.ui_view import SweepLinks, describe_links, publish_sweep_view, ui_url_for
from deconvlab.sweep.views import best_sample_image, config_stats, log_sweep_views, print_leaderboard

DEFAULT_STORAGE = "ray_results"
RAY_PATH_TAG = "deconvlab.ray_experiment_path"
# A multi-worker trial only drives a TorchTrainer whose workers hold the CPUs/GPUs; Ray refuses a
# request of nothing at all, so the driver asks for a sliver of one CPU.
DRIVER_CPU = 0.01


@dataclass
class SweepOutcome:
    """What a finished sweep returns."""

    parent_run_id: str
    experiment_name: str
    experiment_path: str
    leaderboard: pd.DataFrame
    best_trial: str | None
    best_run_id: str | None
    results: ResultGrid | None = None  # Ray Tune's own: every trial's config, metrics, checkpoint, error
    best_sample: str | None = None  # the best trial's before/after image (input | output | target)
    links: SweepLinks | None = None  # MLflow UI URLs that open the sweep's comparison


def _scheduler(spec: SweepSpec, max_epochs: int):
    options = {k: v for k, v in spec.scheduler.items() if k != "type"}
    kind = spec.scheduler["type"]
    if kind == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=options.pop("max_t", max_epochs), **options)
    if kind == "pbt":
        mutations = {k: d.to_tune() for k, d in spec.search_space.items() if d.kind != "grid"}
        return PopulationBasedTraining(time_attr="training_iteration", hyperparam_mutations=mutations, **options)
    return FIFOScheduler()


class ThresholdStopper(Stopper):
    """A sweep file's ``stop``: a trial ends once a reported value reaches its threshold, the sweep's metric
    in its mode's direction (Tune's own dict ``stop`` compares with ``>=`` only, which would end every trial
    of a ``min`` sweep at once)."""

    def __init__(self, thresholds: dict[str, float], metric: str, mode: str) -> None:
        self.thresholds, self.metric, self.mode = thresholds, metric, mode

    def __call__(self, trial_id: str, result: dict) -> bool:
        for key, threshold in self.thresholds.items():
            if key not in result:
                continue
            below = key == self.metric and self.mode == "min"
            if (result[key] <= threshold) if below else (result[key] >= threshold):
                return True
        return False

    def stop_all(self) -> bool:
        return False


def _searcher(spec: SweepSpec):
    if spec.search["type"] != "optuna":
        return None
    if any(d.kind == "grid" for d in spec.search_space.values()):
        raise UserError("optuna search cannot take grid(...) dimensions", f"{spec.path}: search_space",
                        "use choice(...) with optuna, or search: {type: grid}")
    try:  # an optional dependency (pip install 'deconvlab[optuna]'): only optuna sweeps need it
        import optuna  # noqa: F401  (Ray imports it lazily and fails late)
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise UserError("search: {type: optuna} needs Optuna, which is not installed", f"{spec.path}: search",
                        "pip install 'deconvlab[optuna]', or use search: {type: random}") from None
    return OptunaSearch(**{k: v for k, v in spec.search.items() if k != "type"})


def _trial_resources(spec: SweepSpec) -> dict[str, float]:
    if spec.workers_per_trial > 1:
        return {"cpu": DRIVER_CPU, "gpu": 0}
    return {"cpu": spec.resources.get("cpu", 1), "gpu": spec.resources.get("gpu", 0)}


def check_cluster_can_run(spec: SweepSpec, available: dict[str, float]) -> None:
    """A trial asking for more CPUs/GPUs than the whole cluster has would wait forever: refuse it now."""
    workers = max(1, spec.workers_per_trial)
    for kind, key in (("cpu", "CPU"), ("gpu", "GPU")):
        need = float(spec.resources.get(kind, 0)) * workers + (DRIVER_CPU if kind == "cpu" and workers > 1 else 0)
        have = float(available.get(key, 0))
        if need > have:
            raise UserError(f"one trial needs {need:g} {kind.upper()} but the Ray cluster has {have:g}",
                            f"{spec.path}: resources / workers_per_trial",
                            "lower resources per trial or workers_per_trial, or add nodes to the cluster")


def init_ray(address: str | None, verbose: bool = False) -> dict[str, float]:
    """Connect to a cluster (``auto`` or HOST:PORT) or start a local one; returns its resources.

    Unless ``verbose``, the workers' output stays in Ray's session logs (/tmp/ray/session_latest/logs)
    instead of reaching this terminal: it is the stack's chatter per trial, and it arrives late, after
    the leaderboard. A failed trial's error still reaches the user (progress line, child run tag).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address and address != "auto" and not ray.is_initialized():
        _check_port_open(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=verbose)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot reach a Ray cluster at {address!r}: {first_line(exc)}", "--address",
                            "start one (ray start --head) or leave --address out for a local cluster") from None
    return ray.cluster_resources()


def _check_port_open(address: str, timeout_s: float = 5.0) -> None:
    """ray.init waits minutes for an address nobody listens on: knock on the GCS port first."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot reach a Ray cluster at {address!r} ({exc})", "--address",
                        "start one (ray start --head) or leave --address out for a local cluster") from None


def resolve_storage(storage_path: str | None) -> str:
    """Ray's storage_path: an absolute local folder, or a URI (s3://, gs://, ...) kept as given."""
    storage = storage_path or os.environ.get("DECONVLAB_RAY_STORAGE", DEFAULT_STORAGE)
    return storage if "://" in storage else str(Path(storage).resolve())


def latest_experiment(storage: str, spec: SweepSpec) -> str:
    """The newest restorable Ray experiment of this sweep under ``storage`` (a folder or a URI), for --resume."""
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else Path(storage).as_uri())
    entries = filesystem.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = sorted((e.base_name for e in entries if e.type == pyarrow.fs.FileType.Directory
                    and e.base_name.startswith(f"{spec.name}-")), reverse=True)
    for name in names:  # run names end in a timestamp: newest first
        path = f"{storage.rstrip('/')}/{name}"
        if tune.Tuner.can_restore(path):
            return path
    raise UserError(f"no interrupted run of sweep {spec.name!r} to resume", storage,
                    "run it without --resume, or pass the --storage it ran with")


def log_parent(client, run_id: str, spec: SweepSpec, overrides: Sequence[str], path: str) -> None:
    """The sweep's settings as the parent run's params (what the leaderboard and report read back), the Ray
    experiment's path as a tag (how --resume finds the parent again) and the sweep file as an artifact."""
    params = {"sweep.name": spec.name, "sweep.experiment": spec.experiment, "sweep.metric": spec.metric,
              "sweep.mode": spec.mode, "sweep.num_samples": str(spec.num_samples),
              "sweep.repeats": str(spec.repeats),
              "sweep.workers_per_trial": str(spec.workers_per_trial), "sweep.overrides": " ".join(overrides),
              **{f"sweep.scheduler.{k}": str(v) for k, v in spec.scheduler.items()},
              **{f"sweep.search.{k}": str(v) for k, v in spec.search.items()},
              **{f"sweep.resources.{k}": str(v) for k, v in spec.resources.items()},
              **{f"search_space.{k}": f"{d.kind}{tuple(d.args)}" for k, d in spec.search_space.items()}}
    tracking.log_params(client, run_id, params)
    client.set_tag(run_id, RAY_PATH_TAG, path)
    client.log_artifact(run_id, spec.path, "sweep")


def _find_parent(client, experiment: str, path: str) -> str:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], f"tags.`{RAY_PATH_TAG}` = '{path}'") if found else []
    if not runs:
        raise UserError(f"no MLflow parent run for the Ray experiment {path}", "MLFLOW_TRACKING_URI",
                        "resume against the tracking store the sweep started with")
    return runs[0].info.run_id


def _record_best(client: MlflowClient, run_id: str, table: pd.DataFrame, metric: str) -> None:
    """Tag the parent run with the best trial and its run; log the best value of the metric.

    With repeats the best trial is the best seed of the config with the best mean; that config's id and
    statistics over seeds (``config/<stat>/<metric>``) go to the parent too.
    """
    if len(table):
        best = table.iloc[0]
        client.set_tag(run_id, "deconvlab.best_trial", best["trial"])
        client.set_tag(run_id, "deconvlab.best_run_id", best["mlflow_run"])
        client.log_metric(run_id, f"best/{metric}", float(best[f"best {metric}"]))
        if "mean" in table.columns:
            client.set_tag(run_id, "deconvlab.best_config", best["config"])
            for key, value in config_stats(best, metric).items():
                client.log_metric(run_id, key, value)


def finish_sweep(client: MlflowClient, experiment_id: str, parent_id: str, metric: str, uri: str,
                 logged: DriverLog | None = None) -> tuple[pd.DataFrame, str | None, SweepLinks]:
    """What the driver records once the trials are done, before the parent run ends: the leaderboard and its
    views, the best trial, the UI view.

    Args:
        logged: what this driver wrote to the trials' runs, when it wrote all of it (not a resumed sweep).

    Returns:
        The leaderboard, the best trial's before/after image (or None) and the UI links.
    """
    # The child runs' queued writes first (the callback flushes them when Tune ends the experiment; a restored
    # sweep's callback is Ray's unpickled copy, not one this process holds).
    tracking.flush_queues()
    # Trials Ray gave up on (e.g. a lost node past max_failures) must not stay RUNNING.
    close_open_children(client, experiment_id, parent_id, "FAILED")
    # Trial costs, the leaderboard (CSV/HTML/PNG), curves and other plots, best samples, report.html.
    table = log_sweep_views(client, parent_id, logged)
    _record_best(client, parent_id, table, metric)
    sample = best_sample_image(client, parent_id)
    return table, sample, publish_sweep_view(client, parent_id, ui_url_for(uri))


def _reporting(spec: SweepSpec, max_epochs: int, quiet: bool, verbose: bool) -> tuple[int, list]:
    """Tune's verbosity and the driver callbacks that print progress: one line per trial by default,
    Tune's own reporter with ``verbose``, nothing with ``quiet``."""
    if quiet:
        return 0, []
    if verbose:
        return 1, []
    return 0, [TrialProgressLines(spec.metric, spec.mode, max_epochs)]


def describe_plan(spec: SweepSpec) -> str:
    """``6 trials (ASHA, random search), 2 at a time``: what a sweep is about to run, in one line."""
    trials = spec.trial_count()
    scheduler = {"asha": "ASHA", "pbt": "PBT", "fifo": "no early stopping"}.get(spec.scheduler["type"],
                                                                             spec.scheduler["type"])
    return f"{trials} trials ({scheduler}, {spec.search['type']} search), {spec.concurrency()}"


def _build_tuner(spec, trainable, storage, run_name, callbacks, scheduler, searcher, verbosity, restore_path,
                 base_seed):
    space = param_space(spec, base_seed)
    if restore_path:
        return tune.Tuner.restore(restore_path, trainable, resume_unfinished=True, resume_errored=True,
                                  param_space=space)
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, scheduler=scheduler,
                                    **search_settings(spec, searcher, base_seed), time_budget_s=spec.time_budget_s,
                                    # A fresh actor per trial re-imports torch and Lightning (seconds each).
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=run_name, storage_path=storage, callbacks=callbacks, verbose=verbosity,
            stop=ThresholdStopper(spec.stop, spec.metric, spec.mode) if spec.stop else None,
            # PBT exploits other trials' recent checkpoints: deleting them too early breaks its restores
            # (Ray warns below 3; a FileNotFoundError was seen here with 2).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if spec.scheduler["type"] == "pbt" else 2,
                                                    checkpoint_score_attribute=spec.metric,
                                                    checkpoint_score_order=spec.mode),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures)))


def run_sweep(name_or_path: str, overrides: Sequence[str] = (), address: str | None = None,
              smoke_test: bool = False, storage_path: str | None = None, quiet: bool = False,
              resume: bool = False, verbose: bool = False,
              trial_function: Callable[..., None] = run_trial) -> SweepOutcome:
    """Run a sweep end to end: validate, start Ray, run the trials, log parent/child runs and the leaderboard.

    Args:
        name_or_path: a sweep name under ``sweeps/`` or a path to a sweep YAML.
        overrides: Hydra overrides applied to every trial (after the sweep's own).
        address: a Ray cluster address (``auto``, ``HOST:PORT``) or None for a local cluster.
        smoke_test: apply the sweep's ``smoke_test`` block (tiny data, few trials).
        storage_path: where Ray keeps trial checkpoints and experiment state (shared storage on a cluster).
        quiet: no progress output or leaderboard on the terminal.
        resume: continue the newest interrupted run of this sweep (same storage and tracking store).
        verbose: Ray Tune's own progress reporter and the workers' output instead of one line per trial.
        trial_function: the Tune function trainable, called as :func:`~.trial.run_trial` is; a benchmark
            passes a stand-in for training to load the driver, the tracking store and Ray's storage
            (benchmarks/sweep_scale.py).

    Raises:
        UserError: anything wrong with the sweep file, the cluster or the tracking store, before any trial.
    """
    # Ray snapshots the experiment state every few seconds by default; every 2 s, a killed driver loses
    # at most that much bookkeeping (trials then resume from their last checkpoint, not from scratch).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Ray Tune would catch Ctrl-C itself and return as if the sweep had finished: let it interrupt instead,
    # so the parent and open child runs end KILLED (the 2 s snapshots above are what --resume continues).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    # Tune warns when its state snapshots (every 2 s, above) take long on a busy machine; 0 turns the
    # warning off: the snapshots are deliberate.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    spec = load_sweep(name_or_path)
    spec = spec.with_smoke_test() if smoke_test else spec
    overrides = list(overrides)
    validate(spec, overrides)
    base = compose_config([*spec.trial_overrides({}), *overrides])
    uri = tracking.resolve_tracking_uri(base.logger.get("tracking_uri"))
    tracking.check_reachable(uri)
    scheduler, searcher = _scheduler(spec, int(base.trainer.max_epochs)), _searcher(spec)
    check_cluster_can_run(spec, init_ray(address, verbose))
    storage = resolve_storage(storage_path)
    experiment = f"sweep-{spec.name}"
    restore_path = latest_experiment(storage, spec) if resume else None
    run_name = Path(restore_path).name if restore_path else f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = restore_path or f"{storage}/{run_name}"
    parent_id = _find_parent(MlflowClient(uri), experiment, path) if restore_path else None
    tags = {"deconvlab.sweep": spec.name, "deconvlab.role": "parent"}
    with tracking.tracked_run(experiment, run_name, uri, tags, base.logger.get("artifact_root"),
                              run_id=parent_id) as (client, parent_id):
        experiment_id = client.get_run(parent_id).info.experiment_id
        if not restore_path:
            log_parent(client, parent_id, spec, overrides, path)
        sweep_dict = spec.to_dict()
        callback = RepeatsSweepCallback(uri, experiment_id, parent_id, sweep_dict, overrides,
                                        int(base.trainer.max_epochs), base_seed=int(base.seed))
        trainable = tune.with_resources(
            tune.with_parameters(trial_function, sweep=sweep_dict, extra_overrides=overrides, storage_path=storage,
                                 verbose=verbose),
            _trial_resources(spec))
        try:
            verbosity, progress = _reporting(spec, int(base.trainer.max_epochs), quiet, verbose)
            tuner = _build_tuner(spec, trainable, storage, run_name, [callback, *progress], scheduler, searcher,
                                 verbosity, restore_path, int(base.seed))
            if progress:
                print(f"sweep {spec.name}: {describe_plan(spec)}; Ray storage {path}", flush=True)
            # Tune prints an experiment box and a TensorBoard hint even at verbose=0: unless its own reporter was
            # asked for (--verbose), Tune's stdout is dropped (its warnings and errors go to stderr and stay).
            with contextlib.redirect_stdout(io.StringIO()) if not verbose else contextlib.nullcontext():
                results = tuner.fit()
        except BaseException as exc:
            with contextlib.suppress(Exception):  # what the trials' runs got before the sweep broke off
                tracking.flush_queues(timeout_s=60)
            close_open_children(client, experiment_id, parent_id, tracking.status_for(exc))
            raise
        # A resumed sweep's results went to Ray's restored copy of the callback, some to the earlier driver.
        logged = None if restore_path else callback.logged
        table, sample, links = finish_sweep(client, experiment_id, parent_id, spec.metric, uri, logged)
    if not quiet:
        print_leaderboard(table, spec.name, spec.metric, spec.mode)
        served = uri.startswith(("http://", "https://"))  # a server has its UI; a local store needs one started
        print("\n".join(describe_links(links, None if served else f"deconvlab ui --tracking-uri {uri}")), flush=True)
    best = table.iloc[0] if len(table) else None
    return SweepOutcome(parent_id, experiment, path, table, None if best is None else best["trial"],
                        None if best is None else best["mlflow_run"], results, sample, links)
