"""Every view a finished sweep leaves behind, logged from one place: the sweep's parent run and the terminal.

At the end of a sweep, :func:`log_sweep_views` measures every trial's cost (parameters, MACs per pixel,
latency: :mod:`deconvlab.cost`) into its child run, then logs to the parent run:

- ``leaderboard/``: ``leaderboard.csv``, ``leaderboard.html``, ``leaderboard.png`` (the table: one row per
  trial, or per config with its mean, std, n, ci_low, ci_high and tied_with_best over seeds for a sweep with
  repeats, whose trials are then in ``trials.csv``), ``curves.png``, ``curves_by_config.png`` (repeats),
  ``metric_vs_compute.png`` (trials that log ``compute/train_macs``), ``parallel_coordinates.png`` and,
  when costs are known, ``pareto.png`` (:mod:`.plots`);
- ``best_trial/samples/``: the best trial's sample images at up to three epochs;
- ``report.html``: all of it on one self-contained page (:mod:`.report`).

With repeats, every trial's run also gets its config's statistics as ``config/<stat>/<metric>`` metrics
(:func:`deconvlab.promote.config_stat_key`): what ``deconvlab promote`` reads, and sortable in the MLflow UI.

:func:`print_leaderboard` shows the table on the terminal. Each picture is rendered once, by
:func:`~.report.load_report`, and the same bytes go to both the ``leaderboard/`` folder and report.html.
"""

from __future__ import annotations

import math
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pandas as pd
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.table import Table

from deconvlab.cost import costs_of, log_trial_costs, measure_trials
from deconvlab.promote import config_stat_key
from deconvlab.sweep.leaderboard import STAT_COLUMNS
from deconvlab.sweep.plots import render_table
from deconvlab.sweep.records import SAMPLES_DIR, DriverLog, child_runs
from deconvlab.sweep.report import SweepReport, load_report, render_html, statistics_note

LEADERBOARD_DIR = "leaderboard"
BEST_SAMPLES_DIR = f"best_trial/{SAMPLES_DIR}"
REPORT_FILE = "report.html"


def log_sweep_views(client: MlflowClient, parent_run_id: str, logged: DriverLog | None = None) -> pd.DataFrame:
    """Measure and log every trial's cost, then log every view of the sweep to its parent run.

    Args:
        client: a client of the sweep's tracking store.
        parent_run_id: the sweep's parent run (its params name the sweep, metric, mode and search space).
        logged: what the sweep's driver wrote to the trials' runs (configs, curves), so as not to read it back;
            None reads everything from the store.

    Returns:
        The leaderboard read back from MLflow, with the cost columns (``MACs/px``, ``latency ms``) as just
        measured once there is a trial.
    """
    parent = client.get_run(parent_run_id)
    children = child_runs(client, parent.info.experiment_id, parent_run_id)
    measurements = measure_trials(client, [run.info.run_id for run in children],
                                  configs=logged.configs if logged else None) if children else {}
    # The trials' cost writes (two round trips a trial, most of a large sweep's end once nothing is read
    # back) go on a thread of their own while the views below are read, drawn and logged.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deconvlab-costs") as writer:
        costs_written = writer.submit(log_trial_costs, client, measurements)
        # No measurer: a trial that could not be measured is tagged with the reason; measuring it again here
        # would fail the same way, a second time.
        report = load_report(client, parent, logged=logged, costs=costs_of(measurements), children=children)
        _log_views(client, parent_run_id, report)
        costs_written.result()  # a write that failed fails the sweep's end, as it did when written in line
    return report.table


def _log_views(client: MlflowClient, parent_run_id: str, report: SweepReport) -> None:
    """The leaderboard (CSV/HTML/PNG), the best trial's samples and report.html, logged to the parent run."""
    if report.grouped:
        _log_config_stats(client, report)
    with tempfile.TemporaryDirectory() as folder:
        board, samples = Path(folder) / LEADERBOARD_DIR, Path(folder) / SAMPLES_DIR
        _write_leaderboard(report, board)
        _write_samples(report.samples, samples)
        client.log_artifacts(parent_run_id, str(board), LEADERBOARD_DIR)
        if report.samples:
            client.log_artifacts(parent_run_id, str(samples), BEST_SAMPLES_DIR)
    if len(report.table):
        client.log_text(parent_run_id, render_html(report), REPORT_FILE)


def config_stats(row: pd.Series, metric: str) -> dict[str, float]:
    """A leaderboard row's statistics over seeds as ``config/<stat>/<metric>`` metrics (finite ones)."""
    values = {config_stat_key(stat, metric): float(row[stat]) for stat in STAT_COLUMNS}
    return {k: v for k, v in values.items() if math.isfinite(v)}


def _log_config_stats(client: MlflowClient, report: SweepReport) -> None:
    """Every trial's run gets the statistics of its config over seeds (the same for all its seeds)."""
    now = int(time.time() * 1000)
    by_config = {row["config"]: config_stats(row, report.metric) for _, row in report.table.iterrows()}
    for _, trial in report.trials.iterrows():
        metrics = by_config.get(trial["config"], {})
        client.log_batch(trial["mlflow_run"], metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])


def _write_leaderboard(report: SweepReport, folder: Path) -> None:
    """The table as CSV, HTML and PNG, and the plots the report rendered, into ``folder``."""
    folder.mkdir()
    table = report.table
    table.to_csv(folder / "leaderboard.csv", index=False)
    if report.grouped:
        report.trials.to_csv(folder / "trials.csv", index=False)
    table.to_html(folder / "leaderboard.html", index=False, float_format=lambda v: f"{v:.4g}")
    if len(table):  # an empty table has no columns to draw
        render_table(table, folder / "leaderboard.png", f"{report.name}: {report.metric} ({report.mode})")
    for name, (_, data) in report.plots.items():
        (folder / name).write_bytes(data)


def _write_samples(samples: dict[str, dict[str, bytes]], folder: Path) -> None:
    """Sample images as ``folder/<epoch>/<file>.png``."""
    for epoch, images in samples.items():
        (folder / epoch).mkdir(parents=True)
        for file, data in images.items():
            (folder / epoch / file).write_bytes(data)


def print_leaderboard(table: pd.DataFrame, sweep: str, metric: str, mode: str) -> None:
    """The leaderboard on the terminal (the runner prints the MLflow UI links after it).

    Args:
        table: the leaderboard :func:`log_sweep_views` returned.
        sweep: the sweep's name; metric, mode: what it ranked trials by.
    """
    shown = Table(title=f"leaderboard of sweep {sweep}: {metric} ({mode})")
    for column in table.columns:
        shown.add_column(str(column))
    for _, row in table.iterrows():
        shown.add_row(*(("" if v != v else f"{v:.4g}") if isinstance(v, float) else str(v) for v in row))
    console = Console(width=200)
    console.print(shown)
    if "tied_with_best" in table.columns:
        console.print(statistics_note(metric))


def best_sample_image(client: MlflowClient, parent_run_id: str) -> str | None:
    """The best trial's before/after image (input | output | target, e.g. blurred | restored | sharp) at its
    last logged epoch, from the sweep's parent run: a local path when the artifacts are on this machine,
    else its artifact URI; None when the sweep logged no samples (every trial failed, or a task renders none)."""
    epochs = sorted(a.path for a in client.list_artifacts(parent_run_id, BEST_SAMPLES_DIR) if a.is_dir)
    images = sorted(a.path for a in client.list_artifacts(parent_run_id, epochs[-1])
                    if a.path.endswith(".png")) if epochs else []
    if not images:
        return None
    uri = f"{client.get_run(parent_run_id).info.artifact_uri.rstrip('/')}/{images[0]}"
    parsed = urlparse(uri)
    return url2pathname(parsed.path) if parsed.scheme == "file" else uri
