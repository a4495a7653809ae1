"""Looking at tracked runs from the terminal, and the MLflow UI command."""

from __future__ import annotations

import shutil
import sys

from deconvlab import tracking
from deconvlab.errors import UserError

KEY_METRIC_PREFIXES = ("best/", "val/")


def search_runs(experiment: str | None, tracking_uri: str | None, max_results: int = 50):
    """Runs as a pandas DataFrame (newest first), from one experiment or all of them."""
    from mlflow.tracking import MlflowClient

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
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_ids=ids, max_results=max_results, order_by=["attributes.start_time DESC"])


def print_runs_table(experiment: str | None, tracking_uri: str | None, max_results: int = 50) -> None:
    """A Rich table: run, experiment, status, start time and the key (best/ and val/) metrics."""
    from rich.console import Console
    from rich.table import Table

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
