"""The sweep's leaderboard as data, read back from MLflow: one row per trial, ranked by the sweep's metric.

Every view of a sweep (:mod:`.views`, :mod:`.plots`, :mod:`.report`) is drawn from this table: the
trial, its status and epochs, its best metric, its cost (parameters, MACs per pixel, latency), its
sampled hyperparameters and its MLflow run. Which trials are Pareto-optimal is computed here too.
"""

from __future__ import annotations

import math

import pandas as pd
from mlflow.tracking import MlflowClient

from deconvlab.cost import COST_COLUMNS, trial_costs
from deconvlab.sweep.child_runs import EPOCHS_TAG, STOP_REASON_TAG, TRIAL_TAG, child_runs

# Leaderboard columns that are costs, in the order the Pareto plot shows them.
COST_AXES = ("MACs/px", "params", "latency ms")


def _status(run) -> str:
    reason = run.data.tags.get(STOP_REASON_TAG, "")
    return "early stopped" if reason.startswith("stopped early") else run.info.status.lower()


def build_leaderboard(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str,
                      mode: str) -> pd.DataFrame:
    """Rows of (rank, trial, status, epochs, best metric, cost, sampled hyperparameters, MLflow run)."""
    rows = []
    for run in child_runs(client, experiment_id, parent_run_id):
        rows.append({
            "trial": run.data.tags.get(TRIAL_TAG, ""),
            "status": _status(run),
            "epochs": int(run.data.tags.get(EPOCHS_TAG, 0)),
            f"best {metric}": run.data.metrics.get(f"best/{metric}", float("nan")),
            "params": int(run.data.metrics.get("model/num_params", 0)),
            **_cost_columns(run.data.metrics),
            **{k.removeprefix("sampled."): v for k, v in sorted(run.data.params.items())
               if k.startswith("sampled.")},
            "mlflow_run": run.info.run_id,
        })
    table = order_cost_columns(pd.DataFrame(rows))
    if table.empty:
        return table
    table = table.sort_values(f"best {metric}", ascending=(mode == "min"), na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def _cost_columns(metrics: dict[str, float]) -> dict[str, float]:
    """MACs per pixel and latency, once the driver has measured them (``cost/*`` metrics)."""
    if not any(key in metrics for key in COST_COLUMNS):
        return {}
    return {column: metrics.get(key, float("nan")) for key, column in COST_COLUMNS.items()}


def order_cost_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The cost columns right after ``params`` (a trial without costs listed first would push them to
    the end of the table)."""
    costs = [c for c in COST_COLUMNS.values() if c in table.columns]
    if not costs:
        return table
    rest = [c for c in table.columns if c not in costs]
    at = rest.index("params") + 1
    return table[[*rest[:at], *costs, *rest[at:]]]


def with_costs(client: MlflowClient, table: pd.DataFrame) -> pd.DataFrame:
    """The table with cost columns: measured now (and not logged) for a sweep that ran before the driver
    logged costs; as it is when they are there."""
    if len(table) == 0 or "MACs/px" in table.columns:
        return table
    costs = trial_costs(client, list(table["mlflow_run"]), log=False)
    table = table.copy()
    for key, column in COST_COLUMNS.items():
        table[column] = [c.as_metrics()[key] if c is not None else float("nan")
                         for c in (costs[r] for r in table["mlflow_run"])]
    return order_cost_columns(table)


def metric_histories(client: MlflowClient, table: pd.DataFrame,
                     metric: str) -> dict[str, list[tuple[int, float]]]:
    """(epoch, value) of ``metric`` for every trial of the leaderboard."""
    return {row.trial: [(m.step, m.value) for m in client.get_metric_history(row.mlflow_run, metric)]
            for row in table.itertuples()}


def cost_axes(table: pd.DataFrame) -> list[str]:
    """The cost columns of the leaderboard that hold at least one positive value."""
    return [c for c in COST_AXES
            if c in table.columns and (pd.to_numeric(table[c], errors="coerce") > 0).any()]


def pareto_front(costs: list[float], values: list[float], mode: str) -> list[bool]:
    """Which points are Pareto-optimal: no other point is at most as costly and at least as good, and
    strictly better in one of the two. Points with a NaN are never on the front.
    """
    sign = 1.0 if mode == "max" else -1.0
    points = [(c, sign * v) for c, v in zip(costs, values, strict=True)]

    def dominated(i: int) -> bool:
        c, v = points[i]
        return any(oc <= c and ov >= v and (oc < c or ov > v) for j, (oc, ov) in enumerate(points) if j != i
                   and not (math.isnan(oc) or math.isnan(ov)))

    return [not (math.isnan(c) or math.isnan(v)) and not dominated(i) for i, (c, v) in enumerate(points)]
