"""The sweep's leaderboard: one row per trial, ranked by the sweep's metric, rendered for humans."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def build_leaderboard(results, callback, metric: str, mode: str) -> pd.DataFrame:
    """Rows of (rank, trial, status, epochs, best metric, sampled hyperparameters, MLflow run).

    Args:
        results: Tune's ResultGrid.
        callback: the sweep's :class:`~deconvlab.sweep.tracking.MLflowSweepCallback` (best values, runs).
        metric, mode: the ranking.
    """
    rows = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        best = callback.best.get(trial_id)
        rows.append({
            "trial": trial_id,
            "status": callback.outcome.get(trial_id, "ERROR" if result.error else "TERMINATED"),
            "epochs": callback.last_epoch.get(trial_id, 0),
            f"best {metric}": best[0] if best else float("nan"),
            **dict(result.config or {}),
            "mlflow_run": callback.run_ids.get(trial_id, ""),
        })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(f"best {metric}", ascending=(mode == "min"), na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


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


def render_curves(histories: dict[str, pd.DataFrame], metric: str, path: Path) -> None:
    """``metric`` against epoch for every trial in one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for trial_id, history in histories.items():
        if metric in history and "epoch" in history:
            ax.plot(history["epoch"], history[metric], marker="o", label=trial_id)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
