"""The sweep's leaderboard, read back from MLflow: one row per trial, ranked by the sweep's metric."""

from __future__ import annotations

import math
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
    from deconvlab.cost import COST_COLUMNS

    if not any(key in metrics for key in COST_COLUMNS):
        return {}
    return {column: metrics.get(key, float("nan")) for key, column in COST_COLUMNS.items()}


def order_cost_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The cost columns right after ``params`` (a trial without costs listed first would push them to
    the end of the table)."""
    from deconvlab.cost import COST_COLUMNS

    costs = [c for c in COST_COLUMNS.values() if c in table.columns]
    if not costs:
        return table
    rest = [c for c in table.columns if c not in costs]
    at = rest.index("params") + 1
    return table[[*rest[:at], *costs, *rest[at:]]]


def metric_histories(client: MlflowClient, table: pd.DataFrame,
                     metric: str) -> dict[str, list[tuple[int, float]]]:
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
            epochs, values = zip(*sorted(points), strict=True)
            ax.plot(epochs, values, marker="o", label=trial_id)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# -- hyperparameters and cost against the metric -----------------------------------------------------------
# Leaderboard columns that are costs, in the order the Pareto plot shows them.
COST_AXES = ("MACs/px", "params", "latency ms")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _as_axis(values: pd.Series) -> tuple[list[float], list[float], list[str], bool]:
    """One hyperparameter as a parallel-coordinates axis: positions in [0, 1], tick positions and labels.

    Numbers are placed linearly, or logarithmically when positive and spanning more than a decade
    (learning rates); anything else is categorical, evenly spaced in sorted order.

    Returns:
        ``(positions, tick_positions, tick_labels, log_scale)``.
    """
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        lo, hi = float(numbers.min()), float(numbers.max())
        log = lo > 0 and hi / lo > 10
        scaled = numbers.map(math.log10) if log else numbers
        s_lo, s_hi = float(scaled.min()), float(scaled.max())
        span = (s_hi - s_lo) or 1.0
        positions = [(float(v) - s_lo) / span if s_hi > s_lo else 0.5 for v in scaled]
        return positions, [0.0, 1.0] if s_hi > s_lo else [0.5], \
            [f"{lo:.3g}", f"{hi:.3g}"] if s_hi > s_lo else [f"{lo:.3g}"], log
    # str() of each value: pandas 3 keeps missing values missing through astype(str).
    levels = sorted({str(v) for v in values})
    spots = {v: (i / (len(levels) - 1) if len(levels) > 1 else 0.5) for i, v in enumerate(levels)}
    return [spots[str(v)] for v in values], list(spots.values()), levels, False


def render_parallel_coordinates(table: pd.DataFrame, hyperparameters: list[str], metric_column: str,
                                mode: str, path: Path) -> None:
    """One polyline per trial across the sampled hyperparameters and the metric, coloured by the metric.

    Args:
        table: the leaderboard.
        hyperparameters: leaderboard columns holding sampled values (the sweep's search-space keys).
        metric_column: the column with each trial's best metric value.
        mode: "max" or "min"; the colour map runs so that the best trials are always the brightest.
        path: the PNG to write.
    """
    plt = _pyplot()
    axes_names = [h for h in hyperparameters if h in table.columns] + [metric_column]
    columns = [_as_axis(table[name]) for name in axes_names]
    metric = pd.to_numeric(table[metric_column], errors="coerce")
    finite = metric.dropna()
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    cmap = plt.get_cmap("viridis" if mode == "max" else "viridis_r")
    norm = plt.Normalize(lo, hi if hi > lo else lo + 1e-12)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(axes_names)), 4))
    xs = list(range(len(axes_names)))
    # Worst first so the best trials are drawn on top.
    for i in metric.sort_values(ascending=(mode == "max"), na_position="first").index:
        row = table.index.get_loc(i)
        colour = "lightgrey" if pd.isna(metric[i]) else cmap(norm(metric[i]))
        ax.plot(xs, [col[0][row] for col in columns], color=colour, lw=2, alpha=0.9, marker="o", ms=3)
    for x, (name, (_, ticks, labels, log)) in enumerate(zip(axes_names, columns, strict=True)):
        ax.axvline(x, color="black", lw=0.8)
        for tick, label in zip(ticks, labels, strict=True):
            ax.annotate(label, (x, tick), xytext=(4, 0), textcoords="offset points", fontsize=7, va="center")
        axes_names[x] = f"{name}\n(log)" if log else name
    ax.set_xticks(xs, axes_names, fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, len(xs) - 0.6)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric_column)
    ax.set_title("sampled hyperparameters vs metric (one line per trial)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


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


def cost_axes(table: pd.DataFrame) -> list[str]:
    """The cost columns of the leaderboard that hold at least one positive value."""
    return [c for c in COST_AXES
            if c in table.columns and (pd.to_numeric(table[c], errors="coerce") > 0).any()]


def render_pareto(table: pd.DataFrame, metric_column: str, mode: str, path: Path) -> None:
    """The metric against each cost (MACs per pixel, parameters, latency), the Pareto front drawn as steps."""
    plt = _pyplot()
    axes_names = cost_axes(table)
    if not axes_names:
        raise ValueError("the leaderboard has no cost column with values (MACs/px, params, latency ms)")
    fig, axes = plt.subplots(1, len(axes_names), figsize=(4.2 * len(axes_names), 3.8), squeeze=False)
    values = pd.to_numeric(table[metric_column], errors="coerce").tolist()
    for ax, name in zip(axes[0], axes_names, strict=True):
        costs = pd.to_numeric(table[name], errors="coerce").tolist()
        front = pareto_front(costs, values, mode)
        ax.scatter(costs, values, c=["tab:red" if f else "tab:grey" for f in front], zorder=3)
        for cost, value, trial in zip(costs, values, table["trial"], strict=True):
            ax.annotate(str(trial)[-5:], (cost, value), xytext=(3, 3), textcoords="offset points", fontsize=6)
        on_front = sorted((c, v) for c, v, f in zip(costs, values, front, strict=True) if f)
        if on_front:
            ax.step(*zip(*on_front, strict=True), where="post", color="tab:red", lw=1.2, label="Pareto front")
            ax.legend(fontsize=7, loc="lower right" if mode == "max" else "upper right")
        if min(costs) > 0 and max(costs) / min(costs) > 10:
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(metric_column)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric_column} ({mode}) vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
