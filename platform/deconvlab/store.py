"""Reading the MLflow store: a client for a URI, and the look-ups every verb shares.

Runs (by id, or by a unique prefix of one as git takes commits), registered versions (by alias, number or
latest), a run's best checkpoint artifact, the latest run of a sweep and its best trial, and the resolved
``config.yaml`` a run logged. Each look-up fails with one :class:`~deconvlab.errors.UserError` that lists
what does exist. Writing runs is :mod:`deconvlab.tracking`. On a team server a refused request (no login,
no permission) is one ``AccessRefused`` (:mod:`deconvlab.access`).

MLflow and OmegaConf are imported inside the functions that use them: importing MLflow costs 1-2 s, which
the listing commands (``deconvlab runs``, ``models``) skip on a local SQLite store (:mod:`deconvlab.runs`).
"""

from __future__ import annotations

import math
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from deconvlab.access import refusal
from deconvlab.errors import UserError
from deconvlab.locks import is_lock_name
from deconvlab.tracking import resolve_tracking_uri

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from omegaconf import DictConfig

TAG = "deconvlab."
CONFIG_FILE = "config.yaml"
MIN_PREFIX = 6  # as git: shorter prefixes of random hex ids collide too often to name one run
# A run id or a prefix of one, with or without runs:/.
RUN_ID_PATTERN = re.compile(rf"^(?:runs:/)?(?P<run>[0-9a-fA-F]{{{MIN_PREFIX},32}})/?$")
TOO_SHORT = re.compile(rf"^(?:runs:/)?(?P<run>[0-9a-fA-F]{{1,{MIN_PREFIX - 1}}})/?$")
ID_FIX = "deconvlab runs lists the runs and their ids"
MAX_LISTED = 5  # matches of an ambiguous prefix named in its error


def client_for(tracking_uri: str | None = None) -> MlflowClient:
    """A client for the tracking store and its model registry (the same store)."""
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(uri, registry_uri=uri)


def _missing(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


# -- run ids -------------------------------------------------------------------------------------------
def looks_like_run_id(text: str) -> bool:
    """Whether ``text`` has the form of a run id or a prefix of one (``runs:/`` optional), long enough or not."""
    return bool(RUN_ID_PATTERN.match(text) or TOO_SHORT.match(text))


def experiment_names(client: MlflowClient) -> dict[str, str]:
    """Every active experiment: id -> name (all pages)."""
    names: dict[str, str] = {}
    token = None
    while True:
        page = client.search_experiments(page_token=token)
        names |= {e.experiment_id: e.name for e in page}
        token = page.token
        if not token:
            return names


def runs_with_prefix(client: MlflowClient, prefix: str, limit: int = MAX_LISTED + 1) -> list:
    """Up to ``limit`` active runs, in any experiment, whose id starts with ``prefix`` (lower-case hex).

    One search with ``attributes.run_id LIKE 'prefix%'``: MLflow's SQL stores (SQLite, Postgres, MySQL)
    and a tracking server both filter on it, so no run list is read.
    """
    experiments = list(experiment_names(client))
    if not experiments:
        return []
    return list(client.search_runs(experiments, f"attributes.run_id LIKE '{prefix}%'", max_results=limit))


def resolve_run_id(client: MlflowClient, text: str) -> str:
    """The full id of the run ``text`` names: a run id or a unique prefix of >= 6 hex characters of one.

    ``runs:/`` in front and a trailing ``/`` are allowed. A full (32-character) id is returned as it is,
    without a request; :func:`get_run` says if no such run exists.

    Raises:
        UserError: not an id, a prefix shorter than 6 characters, no run with that prefix, or several
            (the error lists them: id, experiment, run name).
    """
    if short := TOO_SHORT.match(text):
        raise UserError(f"run id prefix {short['run']!r} is too short", text,
                        f"give at least {MIN_PREFIX} characters of the id ({ID_FIX})")
    match = RUN_ID_PATTERN.match(text)
    if match is None:
        raise UserError(f"{text!r} is not a run id", text, f"give a run id or its first {MIN_PREFIX}+ characters "
                        f"({ID_FIX})")
    prefix = match["run"].lower()
    if len(prefix) == 32:
        return prefix
    found = runs_with_prefix(client, prefix)
    if not found:
        raise UserError(f"no run id starts with {prefix}", client.tracking_uri, ID_FIX)
    if len(found) > 1:
        names = experiment_names(client)
        listed = "; ".join(f"{r.info.run_id} ({names.get(r.info.experiment_id, '?')} / {r.info.run_name})"
                           for r in found[:MAX_LISTED])
        more = ", and more" if len(found) > MAX_LISTED else ""
        raise UserError(f"run id prefix {prefix} is ambiguous: {listed}{more}", client.tracking_uri,
                        "give more characters of the id")
    return found[0].info.run_id


def get_run(client: MlflowClient, run_id: str):
    """The run with id ``run_id`` (or a unique prefix of it), or a UserError that says how to find ids."""
    from mlflow.exceptions import MlflowException

    run_id = resolve_run_id(client, run_id)
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        raise UserError(f"no run {run_id}", client.tracking_uri, ID_FIX) from None


def find_source_run(client: MlflowClient, source: str):
    """The run ``source`` names: a run id or prefix, else the latest parent run of the sweep of that name.

    A sweep file's path (``sweeps/NAME.yaml``) names its sweep. A prefix that could also be a sweep's name
    (an all-hex name such as ``decade``) is the sweep when a sweep of that name exists.
    """
    sweep = Path(source).stem if source.endswith((".yaml", ".yml")) else source
    if looks_like_run_id(source) and not (len(source) < 32 and _sweep_experiment(client, sweep)):
        return get_run(client, source)
    return sweep_parent(client, sweep)


# -- registry ------------------------------------------------------------------------------------------
def registered_names(client: MlflowClient) -> list[str]:
    """The registered models (not the promotion locks of :mod:`deconvlab.locks`)."""
    return sorted(m.name for m in client.search_registered_models() if not is_lock_name(m.name))


def set_version_tag_if_allowed(client: MlflowClient, name: str, version: str, key: str, value: str) -> bool:
    """Tag a model version, unless the server refuses it (a user with READ on the model): then False.

    For bookkeeping a reader may lack the right to write (e.g. the last evaluation run of a version).
    """
    try:
        client.set_model_version_tag(name, version, key, value)
    except Exception as exc:
        if refusal(exc) is None:
            raise
        return False
    return True


def find_version(client: MlflowClient, name: str, alias: str | None = None, version: str | None = None):
    """The version of ``name`` behind an alias, a number, or (neither) the latest one.

    Raises:
        UserError: unknown model name, alias or version, listing what exists.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        names = ", ".join(registered_names(client)) or "none yet: run deconvlab promote"
        raise UserError(f"no registered model {name!r}", client.tracking_uri,
                        f"registered models: {names}") from None
    if alias is not None:
        if alias not in model.aliases:
            known = ", ".join(f"{a} (v{v})" for a, v in sorted(model.aliases.items())) or "none"
            raise UserError(f"model {name!r} has no alias {alias!r}", f"models:/{name}@{alias}",
                            f"aliases of {name}: {known}")
        return client.get_model_version(name, model.aliases[alias])
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if version is None and versions:
        version = str(versions[-1])
    if version is None or int(version) not in versions:
        raise UserError(f"model {name!r} has no version {version}", f"models:/{name}/{version}",
                        f"versions of {name}: {', '.join(map(str, versions)) or 'none'}")
    return client.get_model_version(name, version)


# -- checkpoints and sweeps ----------------------------------------------------------------------------
def checkpoint_artifact(client: MlflowClient, run) -> str:
    """The artifact path of a run's best checkpoint (``checkpoints/*.ckpt``).

    Raises:
        UserError: the run has no checkpoint: a sweep's parent run (the error names its best trial), a
            failed trial, a run stopped before its first validation.
    """
    if run.data.tags.get(f"{TAG}role") == "parent":
        raise _parent_has_no_checkpoint(client, run)
    tagged = run.data.tags.get(f"{TAG}best_checkpoint")
    listed = client.list_artifacts(run.info.run_id, "checkpoints")
    files = [a.path for a in listed if a.path.endswith(".ckpt")]
    if tagged and tagged in files:
        return tagged
    best = [f for f in files if not f.endswith("/last.ckpt")]
    if not best:
        raise UserError(f"run {run.info.run_id} has no checkpoint (checkpoints/*.ckpt)",
                        f"runs:/{run.info.run_id}",
                        "promote a finished run or sweep trial that validated at least once")
    return best[0]


def _parent_has_no_checkpoint(client: MlflowClient, parent) -> UserError:
    """The error for a sweep's parent run used as a model: it names the best trial's run to use instead."""
    sweep = parent.data.tags.get(f"{TAG}sweep") or "SWEEP"
    where = f"runs:/{parent.info.run_id}"
    what = f"run {parent.info.run_id} is the parent run of sweep {sweep}, which holds no checkpoint"
    found = sweep_best_trial(client, parent)
    if found is None:
        return UserError(what, where, "no trial of it has a checkpoint: rerun the sweep")
    best, metric, value = found
    return UserError(what, where, f"use its best trial, runs:/{best.info.run_id} (best/{metric} = {value:.6g}), "
                                  f"or register that with deconvlab promote {sweep} --name NAME")


def has_checkpoint(client: MlflowClient, run) -> bool:
    try:
        checkpoint_artifact(client, run)
    except UserError:
        return False
    return True


def best_value(run, metric: str) -> float | None:
    """A run's finite ``best/<metric>``, else None."""
    value = run.data.metrics.get(f"best/{metric}")
    return value if value is not None and math.isfinite(value) else None


def sweep_trials_ranked(client: MlflowClient, parent, metric: str, mode: str) -> list:
    """The trial runs of a sweep parent that have a ``best/<metric>``, best first."""
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    ranked = [c for c in children if best_value(c, metric) is not None]
    return sorted(ranked, key=lambda c: best_value(c, metric), reverse=(mode == "max"))


def sweep_best_trial(client: MlflowClient, parent) -> tuple | None:
    """``(run, metric, value)`` of a sweep's best trial with a checkpoint, by the sweep's own metric and mode."""
    metric = parent.data.params.get("sweep.metric")
    if not metric:
        return None
    mode = parent.data.params.get("sweep.mode", "max")
    best = next((c for c in sweep_trials_ranked(client, parent, metric, mode) if has_checkpoint(client, c)), None)
    return None if best is None else (best, metric, best_value(best, metric))


def _sweep_experiment(client: MlflowClient, sweep: str):
    return client.get_experiment_by_name(f"sweep-{sweep}")


def sweep_parent(client: MlflowClient, sweep: str):
    """The latest parent run of sweep ``sweep`` (a FINISHED one when there is one).

    Raises:
        UserError: no sweep of that name, listing the sweeps the store holds.
    """
    experiment = _sweep_experiment(client, sweep)
    parents = client.search_runs([experiment.experiment_id], f"tags.{TAG}role = 'parent'",
                                 order_by=["attributes.start_time DESC"]) if experiment else []
    if not parents:
        sweeps = sorted(e.name.removeprefix("sweep-") for e in client.search_experiments()
                        if e.name.startswith("sweep-"))
        raise UserError(f"no sweep {sweep!r} and no run with that id", client.tracking_uri,
                        f"pass a run id or one of the sweeps: {', '.join(sweeps) or 'none yet'}")
    finished = [p for p in parents if p.info.status == "FINISHED"]
    return (finished or parents)[0]


def run_config(client: MlflowClient, run_id: str) -> DictConfig:
    """The resolved ``config.yaml`` a run logged, read through ``client`` (its server, its login).

    Args:
        run_id: a run id or a unique prefix of one.

    Raises:
        UserError: the run has no config (it was not made by ``deconvlab train`` or ``sweep``).
        AccessRefused: the server refused to read it.
    """
    from mlflow.exceptions import MlflowException
    from omegaconf import OmegaConf

    run_id = resolve_run_id(client, run_id)
    with tempfile.TemporaryDirectory() as folder:
        try:
            return OmegaConf.create(Path(client.download_artifacts(run_id, CONFIG_FILE, folder)).read_text())
        except (MlflowException, OSError) as exc:
            if refusal(exc) is not None:
                raise
            raise UserError(f"run {run_id} has no {CONFIG_FILE}", f"runs:/{run_id}",
                            "use a run made by deconvlab train or deconvlab sweep") from None
