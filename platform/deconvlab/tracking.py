"""MLflow tracking: where runs go, what a run records, and ending runs with the right status.

The embedded default store is SQLite in the working directory (``./mlflow.db``) with artifacts in
``./mlartifacts``; ``MLFLOW_TRACKING_URI`` or the ``logger.tracking_uri`` config key point elsewhere
(a team server over HTTP, Postgres...). A team server's login comes from ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` and is never logged: every param, config and error tag goes through
:func:`deconvlab.access.redact` (see :mod:`deconvlab.access`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import subprocess
import threading
import time
import traceback
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from deconvlab.access import check_credentials, check_uri_has_no_password, redact, refusals_named, secrets
from deconvlab.errors import UserError, was_interrupted

if TYPE_CHECKING:  # MLflow is imported where it is used: it costs 1-2 s, which `deconvlab runs` does without
    from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_ARTIFACT_ROOT = "mlartifacts"
# MLflow's limits on one param value, on params (and tags) per batch call, and on everything in one call.
MAX_PARAM_LENGTH = 6000
PARAMS_PER_BATCH = 100
ENTITIES_PER_BATCH = 1000
# Characters allowed in a folder named after an experiment; anything else (/, .., spaces) becomes "_".
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: ``uri`` if given, else ``MLFLOW_TRACKING_URI``, else ./mlflow.db.

    Raises:
        UserError: an http(s) URI with a password in it (credentials go in the environment, not in URIs).
    """
    return check_uri_has_no_password(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def artifact_location(root: str | None = None) -> str | None:
    """Absolute artifact root for new experiments in a local store; None lets a server decide."""
    root = root or os.environ.get("DECONVLAB_ARTIFACT_ROOT") or DEFAULT_ARTIFACT_ROOT
    if "://" in root:
        return root
    return Path(root).resolve().as_uri()


def safe_name(name: str) -> str:
    """``name`` usable as one folder name: no separators, no leading dots, never empty."""
    return UNSAFE_NAME_CHARS.sub("_", str(name)).lstrip(".") or "unnamed"


def get_or_create_experiment(name: str, tracking_uri: str, artifact_root: str | None = None) -> str:
    """The id of experiment ``name``, created with an explicit artifact location if missing.

    An explicit location matters with SQLite: MLflow would otherwise write artifacts to ./mlruns of
    whatever directory the process happens to run in.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None if tracking_uri.startswith("http") else artifact_location(artifact_root)
    if location is not None:
        location = f"{location.rstrip('/')}/{safe_name(name)}"
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def flatten(config: Mapping[str, Any] | DictConfig, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} with values as strings (MLflow params)."""
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The current git commit of ``cwd`` (or of this package's checkout), None outside a repository."""
    for where in (cwd, Path(__file__).resolve().parent):
        if where is None:
            continue
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True,
                                 timeout=5, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def log_params(client: MlflowClient | TrackingQueue, run_id: str, params: Mapping[str, str],
               tags: Mapping[str, str] | None = None) -> None:
    """Log many params (and ``tags``), in as few batches as MLflow accepts; URL passwords and credentials
    are redacted. The tags ride in the first batch: one round trip for a config of up to 100 keys.
    ``client`` may be a :class:`TrackingQueue`: the batches are then queued."""
    from mlflow.entities import Param, RunTag

    hidden = secrets()
    items = [Param(k, redact(str(v), hidden)) for k, v in params.items()]
    extra = [RunTag(k, redact(str(v), hidden)) for k, v in (tags or {}).items()]
    for start in range(0, max(len(items), 1), PARAMS_PER_BATCH):
        batch = items[start:start + PARAMS_PER_BATCH]
        if batch or extra:
            client.log_batch(run_id, params=batch, tags=extra)
        extra = []


def log_config(client: MlflowClient, run_id: str, cfg: DictConfig) -> None:
    """The resolved config as flattened params and as ``config.yaml``, plus the git commit tag."""
    log_params(client, run_id, flatten(cfg))
    client.log_text(run_id, redact(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
    commit = git_commit()
    if commit:
        client.set_tag(run_id, "mlflow.source.git.commit", commit)


def log_images(client: MlflowClient, run_id: str, images: Mapping[str, np.ndarray], folder: str) -> None:
    """Log uint8 images as PNG artifacts under ``folder``."""
    for name, image in images.items():
        client.log_image(run_id, image, f"{folder}/{name}.png")


def save_images(images: Mapping[str, np.ndarray], folder: Path) -> None:
    """Write uint8 images as PNG files (used where no MLflow run is at hand, e.g. in a sweep trial)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        Image.fromarray(image).save(folder / f"{name}.png")


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one line, when a tracking server does not answer (MLflow itself retries for minutes)
    or refuses this process's login (see :func:`deconvlab.access.check_credentials`)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s).close()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"MLflow tracking server {tracking_uri} is unreachable ({reason})", "MLFLOW_TRACKING_URI",
                        "start the server (see infra/mlflow/README.md) or unset MLFLOW_TRACKING_URI") from None
    check_credentials(tracking_uri, timeout_s)


def status_for(exc: BaseException | None) -> str:
    """MLflow run status for how a run ended: FINISHED, KILLED (interrupted, Ctrl-C) or FAILED."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if was_interrupted(exc) else "FAILED"


def error_tag(exc: BaseException) -> str:
    """The ``error`` tag of a run that did not finish: the exception, or that it was interrupted."""
    if was_interrupted(exc):
        return "KeyboardInterrupt: interrupted (Ctrl-C or SIGINT)"
    return redact(f"{type(exc).__name__}: {exc}")[:5000]


def release_interrupted_reads(exc: BaseException) -> None:
    """Free what a store call cut short by Ctrl-C still holds, so the run's end can be written.

    A KeyboardInterrupt that lands while MLflow reads a SQLite store leaves that read's cursor referenced
    from the traceback's frames. SQLAlchemy closes the connection, but the unfinished statement keeps the
    database's shared lock, so every later write (the run's end) waits out MLflow's 20 s busy timeout and
    fails with "database is locked": the run stays RUNNING. On this machine 39 of 100 interrupts of a
    ``log_batch``/``get_run`` loop left the lock held; with the finished frames cleared, 1 of 600 (their
    locals go; the traceback keeps its lines). Does nothing for any other exception.
    """
    if not was_interrupted(exc):
        return
    seen: set[int] = set()
    chain: list[BaseException | None] = [exc]
    while chain:
        link = chain.pop()
        if link is None or id(link) in seen:
            continue
        seen.add(id(link))
        traceback.clear_frames(link.__traceback__)  # frames still running are skipped
        chain += [link.__cause__, link.__context__]
    gc.collect()  # a cursor in a reference cycle is freed only by the collector


@contextlib.contextmanager
def tracked_run(experiment: str, run_name: str, tracking_uri: str, tags: Mapping[str, str] | None = None,
                artifact_root: str | None = None, run_id: str | None = None) -> Iterator[tuple[MlflowClient, str]]:
    """Open an MLflow run (or reopen ``run_id``) and always close it: FINISHED, FAILED (with the error
    as a tag) or KILLED.

    Raises:
        AccessRefused: the tracking server refused to open the run (no login, or no permission to write
            to ``experiment``): nothing was created.

    Yields:
        ``(client, run_id)``.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    with refusals_named(f"experiment {experiment!r}", tracking_uri):
        if run_id is None:
            experiment_id = get_or_create_experiment(experiment, tracking_uri, artifact_root)
            run_id = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
    try:
        yield client, run_id
    except BaseException as exc:
        release_interrupted_reads(exc)
        client.set_tag(run_id, "error", error_tag(exc))
        client.set_terminated(run_id, status_for(exc))
        raise
    client.set_terminated(run_id, "FINISHED")


class TrackingQueue:
    """Writes runs' metrics, params and tags, and ends runs, on a background thread, merging what waits.

    The sweep driver runs Ray Tune's loop: a round trip to the store per result there caps how many results
    a second a sweep can take (~30 ms per ``log_batch`` on SQLite, more through a server). Here the driver
    only queues; the writer takes everything that waited and sends it as one ``log_batch`` per run (within
    MLflow's limits per call), so the more results arrive at once, the fewer round trips each costs. Per run,
    the order is kept: a run is ended (:meth:`terminate`) only after everything queued before it is written.

    A write that fails is kept and raised by the next :meth:`flush` (nothing is dropped silently); the
    writer then goes on with that run's later writes (its end included) and the other runs.

    Args:
        client: the store's client (MLflow's clients may be shared between threads).
    """

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.busy_s = 0.0  # time the writer spent writing: the driver's tracking work, off its loop
        self.calls = 0  # round trips to the store
        # run id -> [("batch", metrics, params, tags) | ("call", write, args) | ("end", status, ms)]
        self._pending: dict[str, list] = {}
        self._errors: list[BaseException] = []
        self._cond = threading.Condition()
        self._writing = False
        self._thread = threading.Thread(target=self._write_loop, name="deconvlab-tracking", daemon=True)
        self._thread.start()
        _QUEUES.add(self)

    def log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """Queue metrics, params and tags (MLflow entities) for ``run_id``."""
        self._put(run_id, ("batch", list(metrics), list(params), list(tags)))

    def call(self, run_id: str, write: Callable[..., Any], *args: Any) -> None:
        """Queue ``write(*args)`` (an artifact upload, say) for ``run_id``: before the run's next end, and not
        ordered with its batches (which it does not break up). Its arguments must stay valid until it runs
        (a text, a file that stays)."""
        self._put(run_id, ("call", write, args))

    def terminate(self, run_id: str, status: str = "FINISHED") -> None:
        """End ``run_id`` with ``status`` once what was queued for it before is written."""
        self._put(run_id, ("end", status, int(time.time() * 1000)))

    def _put(self, run_id: str, item: tuple) -> None:
        with self._cond:
            self._pending.setdefault(run_id, []).append(item)
            self._cond.notify_all()

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until everything queued so far is written.

        Raises:
            MlflowException (or any error a write raised): the first write that failed since the last flush.
            TimeoutError: the store did not take the queue within ``timeout_s``.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: not self._pending and not self._writing, timeout_s):
                raise TimeoutError(f"the tracking store did not take {len(self._pending)} runs' data "
                                   f"in {timeout_s} s")
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending)
                work, self._pending, self._writing = self._pending, {}, True
            start = time.perf_counter()
            for run_id, items in work.items():
                self._write_run(run_id, items)
            with self._cond:
                self.busy_s += time.perf_counter() - start
                self._writing = False
                self._cond.notify_all()

    def _write_run(self, run_id: str, items: list) -> None:
        # Each write on its own: a batch the store refused must not keep the run's later data, or its end,
        # from being written (the run would stay RUNNING for ever).
        for kind, *content in _merged(items):
            self.calls += 1
            try:
                if kind == "batch":
                    self.client.log_batch(run_id, metrics=content[0], params=content[1], tags=content[2])
                elif kind == "call":
                    content[0](*content[1])
                else:
                    self.client.set_terminated(run_id, content[0], end_time=content[1])
            except Exception as exc:  # noqa: BLE001 - kept for flush() to raise in the driver
                with self._cond:
                    self._errors.append(exc)


# Every queue not yet collected: what a sweep driver flushes before it reads its runs back.
_QUEUES: weakref.WeakSet[TrackingQueue] = weakref.WeakSet()


def queues() -> list[TrackingQueue]:
    """This process's tracking queues (a benchmark reads their ``busy_s`` and ``calls``)."""
    return list(_QUEUES)


def flush_queues(timeout_s: float | None = None) -> None:
    """Flush every :class:`TrackingQueue` of this process (see :meth:`TrackingQueue.flush`)."""
    for queue in list(_QUEUES):
        queue.flush(timeout_s)


def _merged(items: list) -> Iterator[tuple]:
    """A run's queued items as few round trips as MLflow takes: the batches between two ends of the run merged
    up to its limits per call (a param queued twice keeps its first value, a tag its last), the queued calls
    before them, each end after what was queued before it."""
    batch, calls = _Batch(), []
    for item in items:
        if item[0] == "call":
            calls.append(item)
            continue
        if item[0] == "end":
            yield from calls
            if batch.size:
                yield batch.call()
            batch, calls = _Batch(), []
            yield item
            continue
        _, metrics, params, tags = item
        for kind, entity in [*(("metrics", m) for m in metrics), *(("params", p) for p in params),
                             *(("tags", t) for t in tags)]:
            if batch.full(kind):
                yield batch.call()
                batch = _Batch()
            batch.add(kind, entity)
    yield from calls
    if batch.size:
        yield batch.call()


class _Batch:
    """One ``log_batch`` call being filled."""

    def __init__(self) -> None:
        self.metrics: list = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, Any] = {}

    @property
    def size(self) -> int:
        return len(self.metrics) + len(self.params) + len(self.tags)

    def full(self, kind: str) -> bool:
        return self.size >= ENTITIES_PER_BATCH or (kind != "metrics" and len(getattr(self, kind)) >= PARAMS_PER_BATCH)

    def add(self, kind: str, entity: Any) -> None:
        if kind == "metrics":
            self.metrics.append(entity)
        elif kind == "params":
            self.params.setdefault(entity.key, entity)
        else:
            self.tags[entity.key] = entity

    def call(self) -> tuple:
        return "batch", self.metrics, list(self.params.values()), list(self.tags.values())
