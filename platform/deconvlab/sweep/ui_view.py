"""A link that opens the MLflow UI on a sweep's comparison: its trials as rows, best first, with the ranking
metric, the sampled parameters and the cost as columns; charts of the metric per epoch and of the search space.

Opened plainly, the MLflow UI (3.x) shows an experiment in its GenAI overview, and a sweep there is one
collapsed parent row with no metric or parameter column. The UI has two ways in, both read off its own bundle
(``mlflow/server/js/build/static/js``; ``tests/test_ui_view.py`` checks that the installed one still reads them,
``tests/test_browser.py`` opens the link in Chromium):

- the URL parameter ``workflowType=machine_learning`` opens the experiment in "Model training";
- a *shared view*: the experiment tag ``mlflow.sharedViewState.<key>`` holds a view (search facets: filter,
  sort; UI state: columns, column order and widths, charts, which runs the charts show), and the URL parameter
  ``viewStateShareKey=<key>`` opens it. The value is MLflow's saved-view envelope
  ``{"name", "createdAt", "updatedAt", "state": "<the view as JSON>"}``, which the UI also lists, by name, among
  the experiment's saved views.

The UI ignores ``runsExpanded`` in a shared view, so the trials are not shown by expanding their parent: the
view filters on the trials' ``mlflow.parentRunId``, which lists them as rows of their own.
``compareRunsMode=CHART`` in the URL opens the same view on its charts instead of its table.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from mlflow.tracking import MlflowClient

from deconvlab.access import refusal
from deconvlab.store import client_for, get_run
from deconvlab.sweep.records import COST_COLUMNS, child_runs
from deconvlab.sweep.report import find_parent_run

# The experiment tag prefix and the URL parameters the MLflow UI reads.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
SHARE_KEY_PARAM = "viewStateShareKey"
WORKFLOW_PARAM = ("workflowType", "machine_learning")
CHART_MODE_PARAM = ("compareRunsMode", "CHART")
# One view per sweep run, keyed by its parent run: publishing again rewrites it.
SHARE_KEY_PREFIX = "deconvlab-"
# What the driver logs on each trial (child_runs.py, cost.py): sampled values as ``sampled.<key>`` params, the
# cost metrics and the model's parameter count (the leaderboard's "params" column).
SAMPLED_PREFIX = "sampled."
COST_METRICS = (*COST_COLUMNS, "model/num_params")
# The grid's ids of the columns every run has: its name first; its creation time and duration.
NAME_COLUMN = "attributes.`Run Name`"
TRAILING_COLUMNS = ("runDateAndNestInfo", "duration")
# Parameter headers: about 6 px a character at the UI's font, plus room for the sort icon.
MIN_COLUMN_PX, MAX_COLUMN_PX, HEADER_CHAR_PX, HEADER_PAD_PX = 100, 160, 6, 30
METRIC_COLUMN_PX = 140  # the UI prints a metric's every digit (24.821573257446289)
CHART_COLUMNS = 2  # charts side by side in the sweep's section (the UI's default of 3 squeezes the axes)


@dataclass(frozen=True)
class SweepView:
    """What the view of one sweep shows, read off its parent and trial runs by :func:`describe_sweep`.

    Attributes:
        parent_run_id, experiment_id: the sweep's parent run and its experiment.
        name: the parent run's name (``quickstart-20250101-120000``), the saved view's name.
        metric: the ranking metric as the trials log it per epoch (``val/psnr``); mode: ``max`` or ``min``.
        sort_metric: the metric the rows are sorted by: ``best/<metric>`` once a trial has one.
        params: the param keys of the sampled values on the trials (``sampled.optim.lr``).
        costs: the cost metrics the trials have.
        trials: how many trial runs the sweep has.
    """

    parent_run_id: str
    experiment_id: str
    name: str
    metric: str
    mode: str
    sort_metric: str
    params: tuple[str, ...]
    costs: tuple[str, ...]
    trials: int


@dataclass(frozen=True)
class SweepLinks:
    """The URLs of a sweep's view: its table and its charts."""

    table: str
    charts: str


def column(kind: str, key: str) -> str:
    """A column's id as the UI writes it (its canonical sort key): ``column("metrics", "val/psnr")`` is
    ``metrics.`val/psnr```."""
    return f"{kind}.`{key}`"


def _param_key(key: str, trial_params: set[str]) -> str:
    """The trials' param for search-space ``key``: ``sampled.<key>``, or the config's own ``<key>`` for
    trials logged before the driver recorded sampled values."""
    sampled = f"{SAMPLED_PREFIX}{key}"
    return key if sampled not in trial_params and key in trial_params else sampled


def describe_sweep(client: MlflowClient, parent) -> SweepView:
    """Read what a sweep's view shows from its parent run (metric, mode, search space) and its trials."""
    params = parent.data.params
    metric = params.get("sweep.metric", "")
    trials = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    trial_params = {key for run in trials for key in run.data.params}
    trial_metrics = {key for run in trials for key in run.data.metrics}
    space = sorted(key.removeprefix("search_space.") for key in params if key.startswith("search_space."))
    best = f"best/{metric}"
    return SweepView(
        parent_run_id=parent.info.run_id, experiment_id=parent.info.experiment_id,
        name=parent.info.run_name or parent.info.run_id, metric=metric, mode=params.get("sweep.mode", "max"),
        sort_metric=best if best in trial_metrics or metric not in trial_metrics else metric,
        params=tuple(_param_key(key, trial_params) for key in space),
        costs=tuple(c for c in COST_METRICS if c in trial_metrics), trials=len(trials))


def _line_chart(view: SweepView, section: str) -> dict[str, Any]:
    """The metric per epoch (the trials log the epoch as the step), one line per trial."""
    return {"uuid": f"{SHARE_KEY_PREFIX}curve", "type": "LINE", "metricSectionId": section, "deleted": False,
            "isGenerated": False, "runsCountToCompare": view.trials, "metricKey": view.metric,
            "selectedMetricKeys": [view.metric], "xAxisKey": "step", "useGlobalXaxisKey": False,
            "scaleType": "linear", "xAxisScaleType": "linear", "lineSmoothness": 0, "useGlobalLineSmoothing": False}


def _parallel_chart(view: SweepView, section: str) -> dict[str, Any]:
    """MLflow's parallel coordinates over the search space, ending on the ranking metric."""
    return {"uuid": f"{SHARE_KEY_PREFIX}space", "type": "PARALLEL", "metricSectionId": section, "deleted": False,
            "isGenerated": False, "runsCountToCompare": view.trials, "selectedParams": list(view.params),
            "selectedMetrics": [view.sort_metric], "showAllRuns": True}


def _width(key: str) -> int:
    """A column wide enough for the header ``key`` (the grid's default of 100 px cuts dotted keys)."""
    return min(MAX_COLUMN_PX, max(MIN_COLUMN_PX, HEADER_PAD_PX + HEADER_CHAR_PX * len(key)))


def view_state(view: SweepView) -> dict[str, Any]:
    """The UI's view of a sweep: its trials only, best first, with its columns and charts.

    The keys are the UI's own field names; anything left out keeps the UI's default.
    """
    ranking = column("metrics", view.sort_metric)
    params = [column("params", p) for p in view.params]
    metrics = [column("metrics", m) for m in dict.fromkeys([view.metric, *view.costs]) if m != view.sort_metric]
    section = f"{SHARE_KEY_PREFIX}section"
    return {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{view.parent_run_id}'",
        "orderByKey": ranking,
        "orderByAsc": view.mode == "min",
        "selectedColumns": [ranking, *params, *metrics],
        # The grid draws only the columns in sight and would put every metric before any parameter: the ranking
        # metric and the sampled values come first, then the metric's last value and the cost.
        "columnOrder": [NAME_COLUMN, ranking, *params, *metrics, *TRAILING_COLUMNS],
        "columnWidths": {**{column("params", p): _width(p) for p in view.params},
                         **dict.fromkeys([ranking, *metrics], METRIC_COLUMN_PX)},
        "runsHiddenMode": "SHOW_ALL",  # every trial in the charts (the UI's default: the first 10 rows)
        "compareRunCharts": [_line_chart(view, section), _parallel_chart(view, section)],
        "compareRunSections": [{"uuid": section, "name": "sweep", "display": True, "isReordered": True,
                                "deleted": False, "isGenerated": False, "columns": CHART_COLUMNS}],
        # The UI adds a chart of every other metric in sections of its own: after this one, not sorted into it.
        "isAccordionReordered": True,
        "hideEmptyCharts": True,
    }


def share_key(parent_run_id: str) -> str:
    return f"{SHARE_KEY_PREFIX}{parent_run_id}"


def saved_view(name: str, state: dict[str, Any], now_ms: int | None = None) -> str:
    """The tag's value: MLflow's saved-view envelope around the view as JSON."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return json.dumps({"name": name, "createdAt": now_ms, "updatedAt": now_ms, "state": json.dumps(state)})


def _runs_page(ui_url: str, experiment_id: str, query: list[tuple[str, str]]) -> SweepLinks:
    base = f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?"
    return SweepLinks(base + urlencode(query), base + urlencode([*query, CHART_MODE_PARAM]))


def publish_sweep_view(client: MlflowClient, parent_run_id: str, ui_url: str) -> SweepLinks:
    """Write a sweep's view as a tag of its experiment; return the URLs that open it.

    Args:
        client: the sweep's tracking store.
        parent_run_id: the sweep's parent run.
        ui_url: where the MLflow UI answers (:func:`ui_url_for`).

    Returns:
        The URLs; where the tracking server refuses the tag (a user who may read the experiment but not edit
        it), those of the experiment in "Model training" without the view.
    """
    view = describe_sweep(client, get_run(client, parent_run_id))
    key = share_key(view.parent_run_id)
    try:
        client.set_experiment_tag(view.experiment_id, f"{SHARED_VIEW_TAG}{key}",
                                  saved_view(view.name, view_state(view)))
    except Exception as exc:  # a refusal only; anything else goes on up
        if refusal(exc) is None:
            raise
        return _runs_page(ui_url, view.experiment_id, [WORKFLOW_PARAM])
    return _runs_page(ui_url, view.experiment_id, [WORKFLOW_PARAM, (SHARE_KEY_PARAM, key)])


def local_ui_url(host: str = "127.0.0.1", port: int = 5000) -> str:
    """Where ``deconvlab ui --host HOST --port PORT`` answers (on loopback when it listens everywhere)."""
    reachable = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{reachable}]' if ':' in reachable else reachable}:{port}"


def ui_url_for(tracking_uri: str) -> str:
    """Where the MLflow UI of a store answers: a tracking server serves its own; a local store is served by
    ``deconvlab ui`` with its defaults."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return local_ui_url()


def experiments_url(ui_url: str) -> str:
    """The UI's list of experiments, in "Model training"."""
    return f"{ui_url.rstrip('/')}/#/experiments?{urlencode([WORKFLOW_PARAM])}"


def sweep_links(source: str, tracking_uri: str | None, ui_url: str) -> SweepLinks:
    """Publish the view of a sweep given by name (its latest run), parent run id or trial run id.

    Raises:
        UserError: no such sweep or run, or the run is not part of a sweep.
    """
    client = client_for(tracking_uri)
    return publish_sweep_view(client, find_parent_run(client, source).info.run_id, ui_url)


def describe_links(links: SweepLinks, start: str | None = None) -> list[str]:
    """The lines that hand the links to the user; ``start`` is the command that serves the UI, if any."""
    serve = f"run {start}, then open" if start else "open"
    return [f"compare the trials in the MLflow UI: {serve}", f"  {links.table}",
            f"  charts of the same view: {links.charts}"]
