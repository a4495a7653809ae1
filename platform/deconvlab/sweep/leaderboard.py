"""The sweep's leaderboard, read back from MLflow: one row per trial, ranked by the sweep's metric."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from deconvlab.sweep.tracking import EPOCHS_TAG, STOP_REASON_TAG, TRIAL_TAG, child_runs


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
            **{k.removeprefix("sampled."): v for k, v in sorted(run.data.params.items()) if k.startswith("sampled.")},
            "mlflow_run": run.info.run_id,
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(f"best {metric}", ascending=(mode == "min"), na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def metric_histories(client: MlflowClient, table: pd.DataFrame, metric: str) -> dict[str, list[tuple[int, float]]]:
    """(epoch, value) of ``metric`` for every trial of the leaderboard."""
    return {row.trial: [(m.step, m.value) for m in client.get_metric_history(row.mlflow_run, metric)]
            for row in table.itertuples()}


def render_png(table: pd.DataFrame, path: Path, title: str) -> None:
    """The leaderboard as a PNG table (readable in the MLflow UI's artifact view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = table.drop(columns=["mlflow_run"]).copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: f"{v:.4g}")
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(shown.columns)), 0.45 * (len(shown) + 2)))
    ax.axis("off")
    ax.set_title(title)
    cells = ax.table(cellText=shown.values, colLabels=list(shown.columns), loc="center")
    cells.auto_set_font_size(False)
    cells.set_fontsize(8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def render_curves(histories: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> None:
    """``metric`` against epoch for every trial in one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for trial_id, points in histories.items():
        if points:
            epochs, values = zip(*sorted(points))
            ax.plot(epochs, values, marker="o", label=trial_id)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
