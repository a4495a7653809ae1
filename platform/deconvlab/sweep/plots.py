"""The sweep's pictures, each drawn by one function from the leaderboard (:mod:`.leaderboard`).

``leaderboard.png`` (the table), ``curves.png`` (the metric per epoch of every trial),
``parallel_coordinates.png`` (sampled hyperparameters against the metric) and ``pareto.png`` (the metric
against each cost, with the Pareto front). Figures are built with matplotlib's object API, not pyplot:
no global backend or figure registry, so drawing works the same in the sweep driver, in a test and
on a machine with a display.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from deconvlab.sweep.leaderboard import cost_axes, pareto_front

DPI = 120


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def plot_titles(metric: str) -> dict[str, str]:
    """The plots :func:`render_plots` draws, by file name, with their titles (in the report's order)."""
    return {"curves.png": f"{metric} per epoch, all trials",
            "parallel_coordinates.png": "sampled hyperparameters vs metric",
            "pareto.png": "metric vs cost (Pareto front)"}


def render_plots(table: pd.DataFrame, histories: dict[str, list[tuple[int, float]]], metric: str, mode: str,
                 hyperparameters: list[str], folder: Path) -> list[str]:
    """Draw the curves, the parallel coordinates and (when costs are known) the Pareto front into ``folder``.

    Args:
        table: the leaderboard (:func:`~.leaderboard.build_leaderboard`), not empty.
        histories: ``metric`` per epoch of every trial (:func:`~.leaderboard.metric_histories`).
        metric: what the sweep ranks trials by; its leaderboard column is ``best <metric>``.
        mode: "max" or "min".
        hyperparameters: the search space's keys (leaderboard columns).
        folder: where the PNG files go.

    Returns:
        The names of the files written, in the order of :func:`plot_titles`.
    """
    column = f"best {metric}"
    render_curves(histories, metric, folder / "curves.png")
    render_parallel_coordinates(table, hyperparameters, column, mode, folder / "parallel_coordinates.png")
    if cost_axes(table):
        render_pareto(table, column, mode, folder / "pareto.png")
    return [name for name in plot_titles(metric) if (folder / name).is_file()]


def render_table(table: pd.DataFrame, path: Path, title: str) -> None:
    """The leaderboard as a PNG table (readable in the MLflow UI's artifact view)."""
    shown = table.drop(columns=["mlflow_run"]).copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: f"{v:.4g}")
    fig = Figure(figsize=(max(6, 1.6 * len(shown.columns)), 0.45 * (len(shown) + 2)))
    ax = fig.subplots()
    ax.axis("off")
    ax.set_title(title)
    cells = ax.table(cellText=shown.values, colLabels=list(shown.columns), loc="center")
    cells.auto_set_font_size(False)
    cells.set_fontsize(8)
    _save(fig, path)


def render_curves(histories: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> None:
    """``metric`` against epoch for every trial in one plot."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for trial_id, points in histories.items():
        if points:
            epochs, values = zip(*sorted(points), strict=True)
            ax.plot(epochs, values, marker="o", label=trial_id)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if histories:
        ax.legend(fontsize=7)
    _save(fig, path)


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
    axes_names = [h for h in hyperparameters if h in table.columns] + [metric_column]
    columns = [_as_axis(table[name]) for name in axes_names]
    metric = pd.to_numeric(table[metric_column], errors="coerce")
    finite = metric.dropna()
    lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
    cmap = matplotlib.colormaps["viridis" if mode == "max" else "viridis_r"]
    norm = Normalize(lo, hi if hi > lo else lo + 1e-12)
    fig = Figure(figsize=(max(5.0, 1.9 * len(axes_names)), 4))
    ax = fig.subplots()
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
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric_column)
    ax.set_title("sampled hyperparameters vs metric (one line per trial)")
    _save(fig, path)


def render_pareto(table: pd.DataFrame, metric_column: str, mode: str, path: Path) -> None:
    """The metric against each cost (MACs per pixel, parameters, latency), the Pareto front drawn as steps."""
    axes_names = cost_axes(table)
    if not axes_names:
        raise ValueError("the leaderboard has no cost column with values (MACs/px, params, latency ms)")
    fig = Figure(figsize=(4.2 * len(axes_names), 3.8))
    axes = fig.subplots(1, len(axes_names), squeeze=False)
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
    _save(fig, path)
