"""A sweep at cluster scale on one machine: what the driver, the tracking store and Ray's storage sustain.

A simulated cluster (``ray.cluster_utils.Cluster``: a head node and ``--nodes`` nodes declaring
``--gpus-per-node`` logical GPUs each) runs ``--trials`` trials of ``--epochs`` epochs under ASHA, one
logical GPU per trial, through the real ``run_sweep`` (``deconvlab sweep``'s driver: its MLflow callback,
child runs, scheduler, Ray storage, the end-of-sweep views). Only training is replaced: a stand-in trainable
(:func:`standin_trial`) sleeps ``--epoch-s`` per epoch and reports what a trial reports (val/train metrics,
the training compute, its node, a checkpoint folder with ``checkpoint.ckpt`` and the trial's resolved
``config.yaml``). Each backend runs the same sweep: SQLite, and a real ``mlflow server`` on PostgreSQL.

After each sweep the store is read back: a trial is *lost* unless its child run is FINISHED and holds every
epoch the trial reported (the stand-in writes down each epoch before reporting it, independently of Ray and
MLflow). The table's columns:

- ``results/s``: reported results over the time from the first trial's start to the last result;
  ``offered/s`` is what the trials would send if nothing waited (slots / epoch time);
- ``driver s/trial``: the driver's own tracking work per trial: time in the sweep's MLflow callback and in
  its tracking queue's writer thread, plus the time from the last result to the parent run's end (closing
  runs, leaderboard, costs, report);
- ``queued calls/trial``: round trips per trial the tracking queue made (creating the run and artifacts,
  about 3 per trial, are not queued);
- ``slot s/trial``: (sweep wall x slots - epochs run x epoch time) / trials: all overhead, Ray's included;
- ``finish s``: from the last result to the parent run's ``end_time`` in the store; ``of it costs`` the part
  spent measuring the trials' model costs (:func:`deconvlab.cost.measure_trials`, each distinct model built
  and timed once; the cost writes then run on a thread beside the other views, not counted here); ``of it
  backlog`` the part spent waiting for the tracking queue's writer to write what the driver had queued
  before (its flushes after the last result);
- ``peak RSS``: the driver process's peak resident memory during that sweep.

The last line is the server backend's (SQLite's with ``--backend sqlite``):
``trials=N results=R results_per_s=X driver_overhead_per_trial_s=Y lost=Z peak_driver_rss_mb=M``.

    python benchmarks/sweep_scale.py --quick              # 200 trials x 5 epochs, 4 nodes x 8 GPUs
    python benchmarks/sweep_scale.py                      # 1,000 trials x 10 epochs, 8 nodes x 8 GPUs
    python benchmarks/sweep_scale.py --trials 20 --epochs 2 --backend sqlite
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
# What the stand-in trials read from their environment (Ray's workers inherit the driver's, set before the
# cluster starts): seconds per epoch, the base config to write as config.yaml, where to note each epoch.
EPOCH_ENV = "DECONVLAB_SCALE_EPOCH_S"
CHECKPOINT_KB_ENV = "DECONVLAB_SCALE_CHECKPOINT_KB"
BASE_CONFIG_ENV = "DECONVLAB_SCALE_BASE_CONFIG"
REPORTED_ENV = "DECONVLAB_SCALE_REPORTED"
METRIC = "val/psnr"
# The callback methods the driver runs for Tune: their time is the driver's tracking work.
CALLBACK_HOOKS = ("on_trial_start", "on_trial_result", "on_checkpoint", "on_trial_complete", "on_trial_error",
                  "on_trial_recover")


# -- the stand-in trial (runs in Ray workers: imports nothing heavier than Ray and PyYAML) ------------------
def plausible_psnr(sampled: dict, epoch: int, rng: random.Random) -> float:
    """A learning curve that rises towards a ceiling set by the sampled lr (best near 2e-3) and depth."""
    import math

    lr = float(sampled.get("optim.lr", 2e-3))
    ceiling = 26.5 - 1.5 * abs(math.log10(lr / 2e-3)) + 0.1 * int(sampled.get("model.depth", 6))
    return 23.7 + (ceiling - 23.7) * (1 - math.exp(-epoch / 3)) + rng.gauss(0, 0.05)


def trial_config_text(sampled: dict) -> str:
    """The base config with this trial's sampled values set: the resolved config.yaml a trial writes."""
    config = yaml.safe_load(Path(os.environ[BASE_CONFIG_ENV]).read_text())
    for key, value in sampled.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return yaml.safe_dump(config, sort_keys=False)


def standin_trial(sampled: dict, sweep: dict, extra_overrides: list, storage_path: str | None = None,
                  verbose: bool = False) -> None:
    """Stands in for :func:`deconvlab.sweep.trial.run_trial` (same signature): per epoch, sleep and report.

    Reports what ``ReportToRay`` reports (metrics, ``epoch``, ``node_id``, ``compute/*``) with a checkpoint
    folder holding ``checkpoint.ckpt`` (``DECONVLAB_SCALE_CHECKPOINT_KB`` random bytes) and the trial's
    ``config.yaml``. Before each report it appends the epoch to a file named after the trial: the record
    of what was reported that the store is checked against.
    """
    import ray
    from ray import tune

    context = tune.get_context()
    trial_id, epoch_s = context.get_trial_id(), float(os.environ[EPOCH_ENV])
    max_epochs = int(next(o.split("=", 1)[1] for o in sweep["overrides"] if o.startswith("trainer.max_epochs=")))
    node = ray.get_runtime_context().get_node_id()
    rng, config = random.Random(trial_id), trial_config_text(sampled)
    ledger = Path(os.environ[REPORTED_ENV]) / context.get_experiment_name() / trial_id
    ledger.parent.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, max_epochs + 1):
        time.sleep(epoch_s)
        psnr = plausible_psnr(sampled, epoch, rng)
        metrics = {METRIC: psnr, "val/loss": 10 ** (-psnr / 10), "val/ssim": min(1.0, psnr / 30),
                   "train/loss": 10 ** (-psnr / 10) * 0.9, "epoch": epoch, "node_id": node,
                   "compute/train_macs": 3.1e12 * epoch, "compute/train_s": epoch_s * epoch}
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "checkpoint.ckpt").write_bytes(os.urandom(int(os.environ[CHECKPOINT_KB_ENV]) * 1024))
            Path(folder, "config.yaml").write_text(config)
            with ledger.open("a") as out:
                out.write(f"{epoch}\n")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


# -- measuring the driver ----------------------------------------------------------------------------------
@dataclass
class DriverClock:
    """Time spent in the sweep callback's hooks, the first trial start and the last result (wall clock)."""

    busy_s: float = 0.0
    costs_s: float = 0.0
    backlog_s: float = 0.0  # in tracking-queue flushes after the last result
    first_start: float | None = None
    last_result: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, method):
        @functools.wraps(method)
        def wrapper(callback, *args, **kwargs):
            start = time.time()
            try:
                return method(callback, *args, **kwargs)
            finally:
                end = time.time()
                with self.lock:
                    self.busy_s += end - start
                    if method.__name__ == "on_trial_start" and self.first_start is None:
                        self.first_start = start
                    if method.__name__ == "on_trial_result":
                        self.last_result = end
        return wrapper

    def add_costs(self, start: float, end: float) -> None:
        self.costs_s += end - start

    def add_backlog(self, start: float, end: float) -> None:
        if self.last_result is not None and start >= self.last_result:  # a flush at the end, not mid-sweep
            self.backlog_s += end - start


@contextlib.contextmanager
def timing(owner: Any, name: str, record: Callable[[float, float], None]) -> Iterator[None]:
    """For the block's duration, every call of ``owner.name`` passes its start and end times to ``record``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            record(start, time.time())

    setattr(owner, name, timed)
    try:
        yield
    finally:
        setattr(owner, name, original)


def clocked_costs(clock: DriverClock) -> contextlib.AbstractContextManager:
    """Time the end-of-sweep cost measurement (``views.measure_trials``; the cost writes then run on a thread
    beside the other views) into ``clock.costs_s``."""
    from deconvlab.sweep import views

    return timing(views, "measure_trials", clock.add_costs)


def clocked_flushes(clock: DriverClock) -> contextlib.AbstractContextManager:
    """Time the tracking queues' flushes after the last result (the writer's backlog) into
    ``clock.backlog_s``."""
    from deconvlab.tracking import TrackingQueue

    return timing(TrackingQueue, "flush", clock.add_backlog)


@contextlib.contextmanager
def clocked_callback(clock: DriverClock) -> Iterator[None]:
    """Time the sweep's MLflow callback (the class ``run_sweep`` builds) for the duration of one sweep."""
    from deconvlab.sweep.repeats import RepeatsSweepCallback

    originals = {name: RepeatsSweepCallback.__dict__.get(name) for name in CALLBACK_HOOKS}
    for name in CALLBACK_HOOKS:
        setattr(RepeatsSweepCallback, name, clock.timed(getattr(RepeatsSweepCallback, name)))
    try:
        yield
    finally:
        for name, original in originals.items():
            if original is None:
                delattr(RepeatsSweepCallback, name)
            else:
                setattr(RepeatsSweepCallback, name, original)


class PeakRss:
    """The peak resident memory of this process while the block runs, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak_mb, self._stop = 0.0, threading.Event()

    @staticmethod
    def current_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_mb = max(self.peak_mb, self.current_mb())

    def __enter__(self) -> PeakRss:
        self.peak_mb = self.current_mb()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.current_mb())


# -- the store, read back -----------------------------------------------------------------------------------
def reported_epochs(folder: Path) -> dict[str, list[int]]:
    """What every trial reported, from the stand-ins' own notes."""
    return {path.name: [int(line) for line in path.read_text().split()] for path in folder.iterdir()}


def count_lost(uri: str, parent_run_id: str, reported: dict[str, list[int]], trials: int) -> tuple[int, list[str]]:
    """Of the sweep's ``trials``, those without a FINISHED child run whose ``val/psnr`` history holds exactly
    the epochs the trial reported (a trial that reported nothing counts as lost too)."""
    from mlflow.tracking import MlflowClient

    from deconvlab.sweep.records import TRIAL_TAG, child_runs

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = {r.data.tags.get(TRIAL_TAG): r for r in child_runs(client, parent.info.experiment_id, parent_run_id)}
    kept, lost = 0, []
    for trial_id in sorted(set(reported) | set(runs)):
        run, epochs = runs.get(trial_id), sorted(reported.get(trial_id, []))
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, METRIC)) if run else []
        if run is not None and run.info.status == "FINISHED" and epochs and steps == epochs:
            kept += 1
        else:
            lost.append(trial_id)
    return trials - kept, lost[:5]


# -- one sweep per backend ------------------------------------------------------------------------------------
@dataclass
class Outcome:
    backend: str
    trials: int
    results: int
    wall_s: float
    results_per_s: float
    driver_s_per_trial: float
    slot_s_per_trial: float
    finish_s: float
    lost: int
    lost_examples: list[str]
    peak_rss_mb: float
    queued_calls_per_trial: float
    costs_s: float
    backlog_s: float


def write_sweep(folder: Path, args: argparse.Namespace, slots: int) -> Path:
    """The sweep file: the quickstart's search space, ASHA, one logical GPU per trial."""
    spec = {"experiment": "quickstart", "metric": METRIC, "mode": "max",
            "overrides": [f"trainer.max_epochs={args.epochs}", "trainer.enable_progress_bar=false"],
            "search_space": {"model.depth": "randint(5, 9)", "model.max_dilation": "choice([1, 2, 4])",
                             "optim.lr": "loguniform(3e-4, 1e-2)"},
            "scheduler": {"type": "asha", "grace_period": args.grace, "reduction_factor": args.reduction},
            "search": {"type": "random"}, "num_samples": args.trials, "max_concurrent_trials": slots,
            "resources": {"cpu": 1, "gpu": 1}, "max_failures": 0}
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_backend(backend: str, uri: str, folder: Path, sweep: Path, address: str, args: argparse.Namespace,
                slots: int) -> Outcome:
    """Run the sweep against one tracking store and measure it."""
    from mlflow.tracking import MlflowClient

    from deconvlab import tracking
    from deconvlab.sweep.runner import run_sweep

    before = {id(q) for q in tracking.queues()}
    os.environ.update({"MLFLOW_TRACKING_URI": uri, "DECONVLAB_ARTIFACT_ROOT": str(folder / f"artifacts-{backend}")})
    clock = DriverClock()
    start = time.time()
    with PeakRss() as rss, clocked_callback(clock), clocked_costs(clock), clocked_flushes(clock):
        outcome = run_sweep(str(sweep), address=address, storage_path=str(folder / f"ray-{backend}"), quiet=True,
                            trial_function=standin_trial)
    wall = time.time() - start
    ledger = Path(os.environ[REPORTED_ENV]) / Path(outcome.experiment_path).name
    reported = reported_epochs(ledger) if ledger.is_dir() else {}
    results = sum(len(e) for e in reported.values())
    end_ms = MlflowClient(uri).get_run(outcome.parent_run_id).info.end_time
    finish = end_ms / 1000 - (clock.last_result or start)
    lost, examples = count_lost(uri, outcome.parent_run_id, reported, args.trials)
    trials, epoch_s = max(len(reported), 1), args.epoch_s
    fit_span = (clock.last_result or start) - (clock.first_start or start)
    writer = [q for q in tracking.queues() if id(q) not in before]
    return Outcome(backend, len(reported), results, wall, results / max(fit_span, 1e-9),
                   (clock.busy_s + sum(q.busy_s for q in writer) + finish) / trials,
                   (fit_span * slots - results * epoch_s) / trials, finish, lost, examples, rss.peak_mb,
                   sum(q.calls for q in writer) / trials, clock.costs_s, clock.backlog_s)


# -- the driver's tracking alone: the same callback fed Tune's calls directly, as fast as it takes them --------
def asha_stop(index: int, epochs: int, grace: int, reduction: int) -> int:
    """The epoch trial ``index`` stops at under successive halving: at each rung (grace, grace x reduction,
    ...) all but one in ``reduction`` of the trials that reached it stop."""
    rung, survivors = grace, reduction
    while rung < epochs:
        if index % survivors:
            return rung
        rung, survivors = rung * reduction, survivors * reduction
    return epochs


def standin_result(trial, epoch: int, rng: random.Random, epoch_s: float) -> dict:
    """The result Tune hands its callbacks for one epoch of a stand-in trial (Tune's own keys included)."""
    psnr = plausible_psnr(trial.config, epoch, rng)
    return {METRIC: psnr, "val/loss": 10 ** (-psnr / 10), "val/ssim": min(1.0, psnr / 30),
            "train/loss": 10 ** (-psnr / 10) * 0.9, "epoch": epoch, "node_id": f"node-{hash(trial.trial_id) % 8}",
            "compute/train_macs": 3.1e12 * epoch, "compute/train_s": epoch_s * epoch, "training_iteration": epoch,
            "time_this_iter_s": epoch_s, "time_total_s": epoch_s * epoch, "timestamp": int(time.time()),
            "pid": os.getpid(), "done": False}


def drive_callback(backend: str, uri: str, folder: Path, sweep: Path, args: argparse.Namespace,
                   slots: int) -> Outcome:
    """Feed the sweep's MLflow callback Tune's calls for ``args.trials`` trials, ``slots`` at a time, each
    result with a checkpoint folder, with no Ray and no waiting: the results per second the driver's tracking
    can take. Then the same end of the sweep as ``run_sweep`` (:func:`~deconvlab.sweep.runner.finish_sweep`)."""
    from types import SimpleNamespace

    from ray.tune import Checkpoint

    from deconvlab import tracking
    from deconvlab.sweep.repeats import RepeatsSweepCallback
    from deconvlab.sweep.runner import finish_sweep, log_parent
    from deconvlab.sweep.spec import load_sweep

    spec, rng = load_sweep(str(sweep)), random.Random(0)
    space = {"model.depth": lambda: rng.randint(5, 8), "model.max_dilation": lambda: rng.choice([1, 2, 4]),
             "optim.lr": lambda: 10 ** rng.uniform(-3.5, -2)}
    clock, reported, pending = DriverClock(), {}, list(range(args.trials))
    start = time.time()
    tags = {"deconvlab.sweep": spec.name, "deconvlab.role": "parent"}
    with PeakRss() as rss, clocked_costs(clock), tracking.tracked_run(
            f"sweep-{spec.name}", f"{spec.name}-driver-only", uri, tags, str(folder / "artifacts-driver")) as (
            client, parent_id):
        experiment_id = client.get_run(parent_id).info.experiment_id
        log_parent(client, parent_id, spec, [], str(folder / "ray-driver"))
        callback = RepeatsSweepCallback(uri, experiment_id, parent_id, spec.to_dict(), [], args.epochs)
        hooks = {name: clock.timed(getattr(RepeatsSweepCallback, name)).__get__(callback) for name in CALLBACK_HOOKS}
        start = time.time()  # the store is open and the parent logged: from here on, the trials' tracking
        running: list = []
        while pending or running:
            while pending and len(running) < slots:
                index = pending.pop(0)
                trial = SimpleNamespace(trial_id=f"t{index:05d}", config={k: f() for k, f in space.items()},
                                        checkpoint=None, stop=asha_stop(index, args.epochs, args.grace, args.reduction))
                trial.folder = folder / f"checkpoints-{backend}" / trial.trial_id
                trial.folder.mkdir(parents=True)
                (trial.folder / "config.yaml").write_text(trial_config_text(trial.config))
                (trial.folder / "checkpoint.ckpt").write_bytes(os.urandom(args.checkpoint_kb * 1024))
                hooks["on_trial_start"](0, [], trial)
                running.append(trial)
            for trial in list(running):
                epoch = len(reported.setdefault(trial.trial_id, [])) + 1
                result = standin_result(trial, epoch, rng, args.epoch_s)
                result["done"] = epoch == trial.stop < args.epochs
                reported[trial.trial_id].append(epoch)
                hooks["on_trial_result"](0, [], trial, result)
                hooks["on_checkpoint"](0, [], trial, Checkpoint.from_directory(str(trial.folder)))
                if epoch == trial.stop:
                    hooks["on_trial_complete"](0, [], trial)
                    running.remove(trial)
        callback.flush()
        fed = time.time()
        finish_sweep(client, experiment_id, parent_id, spec.metric, uri, callback.logged)
    end_ms = client.get_run(parent_id).info.end_time
    lost, examples = count_lost(uri, parent_id, reported, args.trials)
    results = sum(len(e) for e in reported.values())
    finish, trials = end_ms / 1000 - fed, len(reported)
    return Outcome(f"{backend}*", trials, results, time.time() - start, results / (fed - start),
                   (clock.busy_s + callback.queue.busy_s + finish) / trials, float("nan"), finish, lost, examples,
                   rss.peak_mb, callback.queue.calls / trials, clock.costs_s,
                   0.0)  # the backlog was flushed before `fed`, where the finish is counted from


def load_module(path: Path):
    """A Python file as a module (a test file's helpers, without putting tests/ on the import path)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def tracking_store(backend: str, folder: Path) -> Iterator[str]:
    """SQLite in ``folder``, or a real ``mlflow server`` on a throwaway PostgreSQL (tests' helpers)."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'mlflow-sqlite.db'}"
        return
    servers = load_module(REPO / "tests" / "test_mlflow_server.py")  # the suite's helpers for these servers
    try:
        with servers.postgres_cluster() as database, servers.mlflow_server(database, folder / "server-artifacts") \
                as url:
            yield url
    except BaseException as exc:  # pytest.skip outside pytest: no PostgreSQL binaries
        if type(exc).__name__ == "Skipped":
            raise SystemExit(f"cannot run the PostgreSQL backend: {exc}") from None
        raise


@contextlib.contextmanager
def simulated_cluster(nodes: int, gpus_per_node: int) -> Iterator[str]:
    """A head node without resources for trials and ``nodes`` nodes of logical GPUs; yields its address."""
    from ray.cluster_utils import Cluster

    # Every raylet would claim all of the machine's memory: give each a small share.
    limits = {"memory": 512 * 1024**2, "object_store_memory": 128 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, **limits})
    for _ in range(nodes):
        cluster.add_node(num_cpus=gpus_per_node, num_gpus=gpus_per_node, **limits)
    cluster.wait_for_nodes()
    try:
        yield cluster.address
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def print_table(outcomes: list[Outcome], offered: float) -> None:
    header = (f"{'backend':<10}{'trials':>7}{'results':>9}{'wall s':>8}{'results/s':>11}{'offered/s':>11}"
              f"{'driver s/trial':>16}{'slot s/trial':>14}{'finish s':>10}{'of it costs':>13}{'of it backlog':>15}"
              f"{'queued calls/trial':>20}{'lost':>6}{'peak RSS MB':>13}")
    print(header)
    for o in outcomes:
        print(f"{o.backend:<10}{o.trials:>7}{o.results:>9}{o.wall_s:>8.1f}{o.results_per_s:>11.1f}{offered:>11.1f}"
              f"{o.driver_s_per_trial:>16.3f}{o.slot_s_per_trial:>14.3f}{o.finish_s:>10.1f}{o.costs_s:>13.1f}"
              f"{o.backlog_s:>15.1f}"
              f"{o.queued_calls_per_trial:>20.1f}{o.lost:>6}"
              f"{o.peak_rss_mb:>13.0f}")
        if o.lost_examples:
            print(f"  lost trials on {o.backend}, e.g.: {', '.join(o.lost_examples)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 trials x 5 epochs on 4 nodes x 8 GPUs")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--nodes", type=int, default=None)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--epoch-s", type=float, default=None, help="seconds a stand-in epoch sleeps")
    parser.add_argument("--checkpoint-kb", type=int, default=64)
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace_period (epochs)")
    parser.add_argument("--reduction", type=int, default=3, help="ASHA reduction_factor")
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--driver-only", action="store_true",
                        help="no Ray: feed the driver's MLflow callback Tune's calls as fast as it takes them")
    args = parser.parse_args(argv)
    quick = {"trials": 200, "epochs": 5, "nodes": 4, "epoch_s": 1.0}
    full = {"trials": 1000, "epochs": 10, "nodes": 8, "epoch_s": 2.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "NO_ALBUMENTATIONS_UPDATE": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                       EPOCH_ENV: str(args.epoch_s), CHECKPOINT_KB_ENV: str(args.checkpoint_kb)})
    from omegaconf import OmegaConf

    from deconvlab.config import compose_config

    slots = args.nodes * args.gpus_per_node
    backends = ("sqlite", "postgres") if args.backend == "both" else (args.backend,)
    with tempfile.TemporaryDirectory(prefix="deconvlab-scale-") as tmp:
        folder = Path(tmp)
        sweep = write_sweep(folder, args, slots)
        base = compose_config(["experiment=quickstart", f"trainer.max_epochs={args.epochs}"])
        (folder / "base.yaml").write_text(OmegaConf.to_yaml(base, resolve=True))
        os.environ.update({BASE_CONFIG_ENV: str(folder / "base.yaml"), REPORTED_ENV: str(folder / "reported")})
        print(f"{args.trials} trials x {args.epochs} epochs (ASHA grace {args.grace}, reduction {args.reduction}), "
              f"{args.nodes} nodes x {args.gpus_per_node} logical GPUs, {args.epoch_s} s/epoch, "
              f"{args.checkpoint_kb} KB checkpoints", flush=True)
        outcomes = []
        with contextlib.nullcontext() if args.driver_only else simulated_cluster(args.nodes,
                                                                                 args.gpus_per_node) as address:
            for backend in backends:
                with tracking_store(backend, folder) as uri:
                    if args.driver_only:
                        outcomes.append(drive_callback(backend, uri, folder, sweep, args, slots))
                    else:
                        outcomes.append(run_backend(backend, uri, folder, sweep, address, args, slots))
                    print(f"{backend}: done in {outcomes[-1].wall_s:.1f} s", flush=True)
        print_table(outcomes, slots / args.epoch_s)
        last = outcomes[-1]
        print(f"trials={last.trials} results={last.results} results_per_s={last.results_per_s:.1f} "
              f"driver_overhead_per_trial_s={last.driver_s_per_trial:.3f} lost={last.lost} "
              f"peak_driver_rss_mb={last.peak_rss_mb:.0f}", flush=True)


if __name__ == "__main__":
    main()
