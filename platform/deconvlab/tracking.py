"""MLflow tracking: where runs go, what a run records, and ending runs with the right status.

The embedded default store is SQLite in the working directory (``./mlflow.db``) with artifacts in
``./mlartifacts``; ``MLFLOW_TRACKING_URI`` or the ``logger.tracking_uri`` config key point elsewhere
(a team server over HTTP, Postgres...). A team server's login comes from ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` and is never logged: every param, config and error tag goes through
:func:`deconvlab.access.redact` (see :mod:`deconvlab.access`).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
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
# MLflow's limits on one param value and on params per batch call.
MAX_PARAM_LENGTH = 6000
PARAMS_PER_BATCH = 100
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


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, str]) -> None:
    """Log many params, in batches MLflow accepts; URL passwords and credentials are redacted."""
    from mlflow.entities import Param

    hidden = secrets()
    items = [Param(k, redact(str(v), hidden)) for k, v in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start:start + PARAMS_PER_BATCH])


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
        client.set_tag(run_id, "error", error_tag(exc))
        client.set_terminated(run_id, status_for(exc))
        raise
    client.set_terminated(run_id, "FINISHED")
