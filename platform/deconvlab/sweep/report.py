"""The sweep report: a sweep read back from MLflow, and the one self-contained HTML page it renders to.

:func:`load_report` reads a sweep's leaderboard (with costs), renders its plots (:mod:`.plots`) and
picks the best trial's samples and config; :func:`render_html` makes ``report.html`` of it, which the
sweep driver logs to the parent run (:mod:`.views`) and ``deconvlab report SWEEP -o report.html``
writes for any sweep in the store: one HTML file with every image inlined (base64), no script and no
external link, readable offline without MLflow.
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from deconvlab.errors import UserError
from deconvlab.store import CONFIG_FILE, RUN_ID_PATTERN, client_for, get_run, sweep_parent
from deconvlab.sweep.leaderboard import (
    CI_LEVEL,
    TIE_ALPHA,
    CostMeasurer,
    build_leaderboard,
    build_trials,
    cost_axes,
    metric_histories,
    pareto_front,
    with_costs,
)
from deconvlab.sweep.plots import plot_titles, render_plots
from deconvlab.sweep.records import COMPUTE_KEY, SAMPLES_DIR, DriverLog

# How many epochs of the best trial's samples the report shows (first, ..., last).
MAX_SAMPLE_EPOCHS = 3


@dataclass
class SweepReport:
    """Everything a sweep report shows, read from MLflow.

    Attributes:
        parent: the sweep's parent run.
        table: the leaderboard (with cost columns when measured): one row per trial, or per config with
            repeats (:func:`~.leaderboard.build_leaderboard`).
        metric, mode: what the sweep ranked trials by.
        hyperparameters: the search space's keys (leaderboard columns).
        trials: one row per trial, with its config id (the same as ``table`` without repeats).
        repeats: the sweep's seeds per config.
        plots: PNG files by name: ``(title, bytes)``.
        samples: the best trial's sample images: epoch folder -> file name -> PNG bytes.
        best_config: the best trial's resolved config (YAML).
    """

    parent: object
    table: pd.DataFrame
    metric: str
    mode: str
    hyperparameters: list[str]
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)
    repeats: int = 1
    plots: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    samples: dict[str, dict[str, bytes]] = field(default_factory=dict)
    best_config: str = ""

    @property
    def name(self) -> str:
        """The sweep's name (its file's stem)."""
        return self.parent.data.params.get("sweep.name", self.parent.info.run_name or "sweep")

    @property
    def grouped(self) -> bool:
        """Whether the leaderboard has one row per config (a sweep with repeats)."""
        return "mean" in self.table.columns

    @property
    def metric_column(self) -> str:
        """The column ranking the leaderboard: each config's ``mean`` over seeds, or each trial's value."""
        return "mean" if self.grouped else f"best {self.metric}"

    @property
    def best_run_id(self) -> str | None:
        return str(self.table.iloc[0]["mlflow_run"]) if len(self.table) else None


# -- reading a sweep back ------------------------------------------------------------------------------
def find_parent_run(client: MlflowClient, source: str):
    """The parent run of a sweep given by sweep name (its latest run), parent run id, or a trial's run id."""
    if match := RUN_ID_PATTERN.match(source):
        run = get_run(client, match["run"])
        if "mlflow.parentRunId" in run.data.tags:  # a trial: report its whole sweep
            run = get_run(client, run.data.tags["mlflow.parentRunId"])
        if run.data.tags.get("deconvlab.role") != "parent":
            raise UserError(f"run {source} is not a sweep's parent run", "SWEEP",
                            "pass a sweep name or the parent run id that deconvlab sweep printed")
        return run
    return sweep_parent(client, Path(source).stem if source.endswith((".yaml", ".yml")) else source)


# The search-space distributions that sample on a log scale (:data:`deconvlab.sweep.spec.DISTRIBUTIONS`).
LOG_DISTRIBUTIONS = ("loguniform", "qloguniform")


def log_scaled_keys(params: dict[str, str]) -> set[str]:
    """The search-space keys a sweep samples on a log scale, read from its parent run's params.

    The runner logs each dimension as ``search_space.<key> = kind(args)`` (``loguniform(0.0001, 0.01)``);
    only the kind decides, so a ``choice`` or ``grid`` of numbers spanning decades stays linear.
    """
    return {key.removeprefix("search_space.") for key, text in params.items()
            if key.startswith("search_space.") and text.split("(", 1)[0].strip() in LOG_DISTRIBUTIONS}


def _sweep_settings(parent) -> tuple[str, str, list[str], int]:
    params = parent.data.params
    hyperparameters = sorted(k.removeprefix("search_space.") for k in params if k.startswith("search_space."))
    return params["sweep.metric"], params.get("sweep.mode", "max"), hyperparameters, \
        int(params.get("sweep.repeats", "1"))


def _artifact_text(client: MlflowClient, run_id: str, path: str) -> str:
    """A top-level text artifact of a run, "" when the run has none of that name."""
    if path not in {a.path for a in client.list_artifacts(run_id)}:
        return ""
    with tempfile.TemporaryDirectory() as folder:
        return Path(client.download_artifacts(run_id, path, folder)).read_text()


def best_samples(client: MlflowClient, run_id: str,
                 max_epochs: int = MAX_SAMPLE_EPOCHS) -> dict[str, dict[str, bytes]]:
    """PNG samples of a run at up to ``max_epochs`` epochs (evenly picked, first and last included)."""
    epochs = sorted(a.path for a in client.list_artifacts(run_id, SAMPLES_DIR) if a.is_dir)
    if len(epochs) > max_epochs:
        step = (len(epochs) - 1) / (max_epochs - 1)
        epochs = [epochs[round(i * step)] for i in range(max_epochs)]
    samples: dict[str, dict[str, bytes]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for epoch in epochs:
            local = Path(client.download_artifacts(run_id, epoch, folder))
            samples[Path(epoch).name] = {p.name: p.read_bytes() for p in sorted(local.glob("*.png"))}
    return samples


def _plots(client: MlflowClient, report: SweepReport, logged: DriverLog | None) -> dict[str, tuple[str, bytes]]:
    """Every plot of :func:`~.plots.plot_titles` the sweep has data for, as PNG files."""
    titles = plot_titles(report.metric)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        histories = metric_histories(client, report.trials, report.metric, logged)
        # Empty for runs from before compute was logged.
        compute = metric_histories(client, report.trials, COMPUTE_KEY, logged)
        names = render_plots(report.table, report.trials, histories, compute, report.metric, report.mode,
                             report.hyperparameters, out, log_scaled_keys(report.parent.data.params))
        return {name: (titles[name], (out / name).read_bytes()) for name in names}


def load_report(client: MlflowClient, parent, measure_costs: CostMeasurer | None = None,
                logged: DriverLog | None = None, costs: Mapping[str, Any] | None = None,
                children: list | None = None) -> SweepReport:
    """Read a sweep's leaderboard, costs, histories and best samples from MLflow and render its plots.

    Args:
        client: a client of the sweep's store.
        parent: the sweep's parent run.
        measure_costs: measures the trials' costs when none of them has cost metrics (a sweep that ran
            before the driver logged them); None leaves the cost columns and the Pareto plot out.
        logged: what the sweep's driver wrote (at the end of its sweep): the curves it knows are not read back.
        costs: the trials' costs by run id, just measured (their writes may still be under way).
        children: the sweep's child runs, when the caller has just read them.
    """
    metric, mode, hyperparameters, repeats = _sweep_settings(parent)
    trials = build_trials(client, parent.info.experiment_id, parent.info.run_id, metric, mode, children)
    trials = with_costs(client, trials, measure_costs, costs)
    report = SweepReport(parent, build_leaderboard(trials, metric, mode, repeats), metric, mode, hyperparameters,
                         trials, repeats)
    if report.best_run_id is None:
        return report
    report.plots = _plots(client, report, logged)
    report.samples = best_samples(client, report.best_run_id)
    report.best_config = _artifact_text(client, report.best_run_id, CONFIG_FILE)
    return report


# -- HTML ----------------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } tr.best td { background: #fff6d5; font-weight: 600; }
tr.tied td { background: #eef6ee; }
td.pareto { color: #b00; } img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; } figure.sample img { height: 160px; image-rendering: pixelated; }
figcaption { font-size: 0.9em; color: #555; } .samples { display: flex; flex-wrap: wrap; gap: 0 1.5em; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.8em; }
.meta td { text-align: left; border: none; padding: 1px 8px; }
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


# A plain decimal number. Not float()'s wider syntax: it reads a Ray trial id such as "12e45_00001" as
# 12e4500001 (underscores group digits in Python literals), and that trial would show as "inf".
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _cell(value) -> str:
    if isinstance(value, str):
        # Sampled values arrive as MLflow params (strings): show numbers at the table's precision.
        if not NUMBER.fullmatch(value.strip()):
            return html.escape(value)
        value = int(value) if value.strip().lstrip("-+").isdigit() else float(value)
    if isinstance(value, float):
        return "" if value != value else f"{value:.4g}"
    return html.escape(str(value))


def _pareto_marks(report: SweepReport) -> list[bool]:
    axes = cost_axes(report.table)
    if not axes:
        return [False] * len(report.table)
    costs = pd.to_numeric(report.table[axes[0]], errors="coerce").tolist()
    values = pd.to_numeric(report.table[report.metric_column], errors="coerce").tolist()
    return pareto_front(costs, values, report.mode)


def _table_html(table: pd.DataFrame, table_id: str, pareto: list[bool] | None = None,
                axis: str = "") -> str:
    """A table of runs: the first row highlighted, rows tied with the best shaded, Pareto marks if given."""
    columns = [c for c in table.columns if c != "mlflow_run"] + ["run"]
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    pareto_head = f"<th>Pareto ({html.escape(axis)})</th>" if pareto is not None else ""
    rows = []
    for i, row in enumerate(table.to_dict("records")):
        cells = "".join(f"<td>{_cell(row[c])}</td>" for c in columns[:-1])
        cells += f"<td><code>{html.escape(str(row['mlflow_run']))[:8]}</code></td>"
        mark = f'<td class="pareto">{"&#9733;" if pareto[i] else ""}</td>' if pareto is not None else ""
        kind = "best" if i == 0 else "tied" if bool(row.get("tied_with_best", False)) else ""
        rows.append(f'<tr class="{kind}">{cells}{mark}</tr>')
    return f'<table id="{table_id}"><tr>{head}{pareto_head}</tr>{"".join(rows)}</table>'


def leaderboard_html(report: SweepReport) -> str:
    """The leaderboard as an HTML table; the best trial (or config) highlighted, configs tied with it
    shaded, Pareto-optimal rows marked."""
    axes = cost_axes(report.table)
    return _table_html(report.table, "leaderboard", _pareto_marks(report) if axes else None,
                       axes[0] if axes else "")


def statistics_note(metric: str) -> str:
    """What the columns of a leaderboard grouped by config mean (the terminal and report.html say it)."""
    return (f"One row per config. mean, std: over the config's n seeds, of each seed's best {metric}. "
            f"ci_low, ci_high: the {CI_LEVEL:.0%} Student t interval of that mean (blank when n = 1). "
            f"tied_with_best: not distinguishable from the config with the best mean by Welch's t-test, "
            f"one-sided in the metric's direction, at alpha = {TIE_ALPHA:g} (true when either has n < 2). "
            "trial, run and the cost columns are the config's best seed's.")


def _meta(report: SweepReport) -> str:
    info, params = report.parent.info, report.parent.data.params
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime((info.start_time or 0) / 1000))
    items = {"sweep": params.get("sweep.name", ""), "parent run": info.run_id, "status": info.status,
             "started": started, "ranked by": f"{report.metric} ({report.mode})",
             "search space": ", ".join(f"{k} = {params[f'search_space.{k}']}"
                                       for k in report.hyperparameters),
             "trials": str(len(report.trials) if len(report.trials) else len(report.table)),
             **({"configs": f"{len(report.table)} x {report.repeats} seeds"} if report.grouped else {}),
             "best run": report.best_run_id or "none"}
    return '<table class="meta">' + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                                           for k, v in items.items()) + "</table>"


def render_html(report: SweepReport) -> str:
    """The report as one self-contained HTML page (inline CSS, base64 images, no scripts or links)."""
    name = html.escape(report.name)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>deconvlab sweep {name}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>Sweep {name}</h1>", _meta(report),
             "<h2>Leaderboard</h2>", leaderboard_html(report),
             *([f"<p>{html.escape(statistics_note(report.metric))}</p>", "<h2>Trials</h2>",
                _table_html(report.trials, "trials")] if report.grouped else []),
             "<p>MACs/px: multiply-accumulates of one forward pass per input pixel (convolutions and matrix "
             "products; FFTs are not counted). Latency: median of 5 forward passes on one validation input, "
             "measured in the sweep driver.</p>"]
    for title, data in report.plots.values():
        parts.append(f"<h2>{html.escape(title)}</h2><figure>{_img(data, title)}</figure>")
    if report.samples:
        best = html.escape(report.best_run_id or "")
        parts.append(f"<h2>Best trial's samples</h2><p>run <code>{best}</code></p>")
        for epoch, images in report.samples.items():
            figures = "".join(f'<figure class="sample">{_img(data, f"{epoch}/{file}")}'
                              f"<figcaption>{html.escape(file)}</figcaption></figure>"
                              for file, data in images.items())
            parts.append(f'<h3>{html.escape(epoch)}</h3><div class="samples">{figures}</div>')
    if report.best_config:
        parts.append(f"<h2>Best trial's config</h2><pre>{html.escape(report.best_config)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(source: str, output: str | Path, tracking_uri: str | None = None,
                 measure_costs: CostMeasurer | None = None) -> Path:
    """Write the HTML report of a sweep (by name or parent run id) to ``output``.

    Args:
        source: a sweep name (its latest parent run), a sweep file path, or a parent run id.
        output: the HTML file to write (folders are created).
        tracking_uri: the MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db).
        measure_costs: see :func:`load_report` (the command line passes :func:`deconvlab.cost.trial_costs`,
            imported only when a sweep needs it).
    """
    client = client_for(tracking_uri)
    report = load_report(client, find_parent_run(client, source), measure_costs)
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")
    return path
