"""Looking at the store from the terminal: tracked runs, registered model versions; the MLflow UI command."""

from __future__ import annotations

import shutil
import sys
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from deconvlab import tracking
from deconvlab.errors import UserError
from deconvlab.locks import is_lock_name
from deconvlab.store import TAG, client_for, find_version

KEY_METRIC_PREFIXES = ("best/", "val/")


def search_runs(experiment: str | None, tracking_uri: str | None, max_results: int = 50):
    """Runs as a pandas DataFrame (newest first), from one experiment or all of them."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = [e.name for e in client.search_experiments()]
            raise UserError(f"no MLflow experiment {experiment!r}", uri,
                            f"choose one of: {', '.join(names) or '(none yet: run deconvlab train first)'}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_ids=ids, max_results=max_results, order_by=["attributes.start_time DESC"])


def print_runs_table(experiment: str | None, tracking_uri: str | None, max_results: int = 50) -> None:
    """A Rich table: run, experiment, status, start time and the key (best/ and val/) metrics."""
    runs = search_runs(experiment, tracking_uri, max_results)
    metric_columns = [c for c in runs.columns
                      if c.startswith("metrics.") and c.removeprefix("metrics.").startswith(KEY_METRIC_PREFIXES)]
    table = Table(title=f"runs in {tracking.resolve_tracking_uri(tracking_uri)}")
    for column in ("run", "name", "status", "started", *(c.removeprefix("metrics.") for c in metric_columns)):
        table.add_column(column)
    for _, row in runs.iterrows():
        metrics = [f"{row[c]:.4g}" if row[c] == row[c] else "" for c in metric_columns]
        table.add_row(row["run_id"][:8], str(row.get("tags.mlflow.runName", "")), row["status"],
                      str(row["start_time"])[:19], *metrics)
    Console(width=200).print(table)


def mlflow_ui_command(tracking_uri: str | None, port: int, host: str = "127.0.0.1") -> list[str]:
    """The ``mlflow ui`` command line serving the same store, on loopback unless ``host`` says otherwise."""
    mlflow_exe = shutil.which("mlflow") or f"{sys.executable} -m mlflow"
    uri = tracking.resolve_tracking_uri(tracking_uri)
    command = [*mlflow_exe.split(), "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
               # One worker: the default four take a minute to answer on a small, busy machine.
               "--workers", "1"]
    if not uri.startswith("http"):
        command += ["--default-artifact-root", tracking.artifact_location()]
    return command


# -- listing -------------------------------------------------------------------------------------------
def list_versions(tracking_uri: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
    """One row per registered version: name, version, aliases, metric, value, source run, sweep, dataset."""
    client = client_for(tracking_uri)
    if name is not None:
        find_version(client, name)  # a clear error for an unknown name
    rows = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        if name not in (None, model.name) or is_lock_name(model.name):
            continue
        by_version: dict[str, list[str]] = {}
        for alias, number in model.aliases.items():
            by_version.setdefault(str(number), []).append(alias)
        for version in sorted(client.search_model_versions(f"name='{model.name}'"),
                              key=lambda v: int(v.version)):
            tags = version.tags
            rows.append({"name": model.name, "version": int(version.version),
                         "aliases": sorted(by_version.get(str(version.version), [])),
                         "metric": tags.get(f"{TAG}metric"), "value": float(tags.get(f"{TAG}metric_value",
                                                                                     "nan")),
                         "run_id": version.run_id, "sweep": tags.get(f"{TAG}sweep"),
                         "trial": tags.get(f"{TAG}trial_id"), "dataset": tags.get(f"{TAG}dataset"),
                         "family": tags.get(f"{TAG}family")})
    return rows


def print_versions(rows: list[dict[str, Any]], tracking_uri: str | None = None) -> None:
    """A Rich table of :func:`list_versions` rows."""
    table = Table(title=f"registered models in {tracking.resolve_tracking_uri(tracking_uri)}")
    for column in ("name", "version", "aliases", "metric", "value", "family", "sweep / trial", "run",
                   "dataset"):
        table.add_column(column)
    for row in rows:
        origin = f"{row['sweep']} / {row['trial']}" if row["sweep"] else "-"
        table.add_row(row["name"], str(row["version"]), ", ".join(row["aliases"]), row["metric"] or "",
                      f"{row['value']:.6g}", row["family"] or "", origin, (row["run_id"] or "")[:8],
                      row["dataset"] or "")
    Console(width=200).print(table if rows else "no registered models yet: run deconvlab promote")
