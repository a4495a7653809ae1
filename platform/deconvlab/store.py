"""Reading the MLflow store: a client for a URI, and the look-ups every verb shares.

Runs, registered versions (by alias, number or latest), a run's best checkpoint artifact, the latest
run of a sweep, and the resolved ``config.yaml`` a run logged. Each look-up fails with one
:class:`~deconvlab.errors.UserError` that lists what does exist. Writing runs is :mod:`deconvlab.tracking`.
On a team server a refused request (no login, no permission) is one ``AccessRefused`` (:mod:`deconvlab.access`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from deconvlab.access import refusal
from deconvlab.errors import UserError
from deconvlab.locks import is_lock_name
from deconvlab.tracking import resolve_tracking_uri

TAG = "deconvlab."
CONFIG_FILE = "config.yaml"
RUN_ID_PATTERN = re.compile(r"^(?:runs:/)?(?P<run>[0-9a-fA-F]{32})/?$")


def client_for(tracking_uri: str | None = None) -> MlflowClient:
    """A client for the tracking store and its model registry (the same store)."""
    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(uri, registry_uri=uri)


def _missing(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def get_run(client: MlflowClient, run_id: str):
    """The run with id ``run_id``, or a UserError that says how to find ids."""
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        raise UserError(f"no run {run_id}", client.tracking_uri, "check the id with deconvlab runs") from None


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


def checkpoint_artifact(client: MlflowClient, run) -> str:
    """The artifact path of a run's best checkpoint (``checkpoints/*.ckpt``).

    Raises:
        UserError: the run has no checkpoint (a failed trial, a run stopped before its first validation).
    """
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


def has_checkpoint(client: MlflowClient, run) -> bool:
    try:
        checkpoint_artifact(client, run)
    except UserError:
        return False
    return True


def sweep_parent(client: MlflowClient, sweep: str):
    """The latest parent run of sweep ``sweep`` (a FINISHED one when there is one).

    Raises:
        UserError: no sweep of that name, listing the sweeps the store holds.
    """
    experiment = client.get_experiment_by_name(f"sweep-{sweep}")
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

    Raises:
        UserError: the run has no config (it was not made by ``deconvlab train`` or ``sweep``).
        AccessRefused: the server refused to read it.
    """
    with tempfile.TemporaryDirectory() as folder:
        try:
            return OmegaConf.create(Path(client.download_artifacts(run_id, CONFIG_FILE, folder)).read_text())
        except (MlflowException, OSError) as exc:
            if refusal(exc) is not None:
                raise
            raise UserError(f"run {run_id} has no {CONFIG_FILE}", f"runs:/{run_id}",
                            "use a run made by deconvlab train or deconvlab sweep") from None
