"""The sweep's pictures, each drawn by one function from the leaderboard (:mod:`.leaderboard`).

``leaderboard.png`` (the table), ``curves.png`` (the metric per epoch of every trial), with repeats
``curves_by_config.png`` (each config's mean per epoch with a 95 % band over its seeds),
``metric_vs_compute.png`` (each trial's best-so-far metric against its cumulative training MACs),
``parallel_coordinates.png`` (sampled hyperparameters against the metric) and ``pareto.png`` (the metric
against each cost, with the Pareto front). Figures are built with matplotlib's object API, not pyplot:
no global backend or figure registry, so drawing works the same in the sweep driver, in a test and
on a machine with a display.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.axis import Axis
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from deconvlab.sweep.leaderboard import cost_axes, pareto_front, seed_stats

DPI = 120
History = dict[str, list[tuple[int, float]]]


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")


def short_number(value: float, _position: object = None) -> str:
    """A tick label: ``2k``, ``50k``, ``1M``, ``3G`` for large numbers, ``0.05``, ``20`` for the rest."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def readable_log_axis(axis: Axis, lo: float, hi: float) -> None:
    """Label a log axis spanning ``lo``..``hi`` with few, short, non-overlapping numbers.

    matplotlib's default labels the minor ticks of a log axis that spans less than about two decades
    (``3x10^3 4x10^3 6x10^3``), and those labels run together. Here ticks sit at 1-2-5 steps when the
    axis spans at most two decades, at whole decades (at most six labelled) beyond that, and minor
    ticks carry no label.
    """
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
    subs = (1.0, 2.0, 5.0) if decades <= 2 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=6 if decades > 2 else 10))
    axis.set_major_formatter(FuncFormatter(short_number))
    axis.set_minor_formatter(NullFormatter())


def plot_titles(metric: str) -> dict[str, str]:
    """The plots :func:`render_plots` draws, by file name, with their titles (in the report's order)."""
    return {"curves.png": f"{metric} per epoch, all trials",
            "curves_by_config.png": f"{metric} per epoch by config: mean over seeds, 95 % band",
            "metric_vs_compute.png": f"best-so-far {metric} vs training compute",
            "parallel_coordinates.png": "sampled hyperparameters vs metric",
            "pareto.png": "metric vs cost (Pareto front)"}


def render_plots(table: pd.DataFrame, trials: pd.DataFrame, histories: History, compute: History, metric: str,
                 mode: str, hyperparameters: list[str], folder: Path,
                 log_scaled: Collection[str] = ()) -> list[str]:
    """Draw every plot of :func:`plot_titles` that the sweep has data for into ``folder``.

    Args:
        table: the leaderboard (:func:`~.leaderboard.build_leaderboard`), not empty: one row per trial, or
            per config (ranked by its ``mean``) for a sweep with repeats.
        trials: one row per trial (:func:`~.leaderboard.build_trials`), with its ``config``.
        histories: ``metric`` per epoch of every trial (:func:`~.leaderboard.metric_histories`).
        compute: ``compute/train_macs`` per epoch of the trials that log it (others are left out).
        metric: what the sweep ranks trials by; its leaderboard column is ``best <metric>``.
        mode: "max" or "min".
        hyperparameters: the search space's keys (leaderboard columns).
        folder: where the PNG files go.
        log_scaled: the hyperparameters the search space samples on a log scale (their parallel-coordinates
            axis is logarithmic and marked "(log)").

    Returns:
        The names of the files written, in the order of :func:`plot_titles`.
    """
    column = "mean" if "mean" in table.columns else f"best {metric}"
    configs = trials.groupby("config", sort=False)["trial"].apply(list).to_dict() if "config" in trials else {}
    render_curves(histories, metric, folder / "curves.png")
    if "mean" in table.columns:
        render_curves_by_config(histories, configs, metric, folder / "curves_by_config.png")
    if any(best_so_far_vs_compute(histories.get(t, []), points, mode) for t, points in compute.items()):
        render_metric_vs_compute(histories, compute, configs if "mean" in table.columns else {}, metric, mode,
                                 folder / "metric_vs_compute.png")
    render_parallel_coordinates(table, hyperparameters, column, mode, folder / "parallel_coordinates.png",
                                log_scaled)
    if cost_axes(table):
        render_pareto(table, column, mode, folder / "pareto.png")
    return [name for name in plot_titles(metric) if (folder / name).is_file()]


def render_table(table: pd.DataFrame, path: Path, title: str) -> None:
    """The leaderboard as a PNG table (readable in the MLflow UI's artifact view)."""
    shown = table.drop(columns=["mlflow_run"]).copy()
    for column in shown.columns:
        if shown[column].dtype.kind == "f":
            shown[column] = shown[column].map(lambda v: "" if v != v else f"{v:.4g}")
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
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    _save(fig, path)


def render_curves_by_config(histories: History, configs: dict[str, list[str]], metric: str, path: Path) -> None:
    """Each config's ``metric`` per epoch: the mean over its seeds, and a band of the 95 % Student t interval
    of that mean at the epochs two or more seeds reached (a seed stopped early by ASHA leaves the later ones).
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for config, trials in configs.items():
        per_epoch: dict[int, list[float]] = {}
        for trial in trials:
            for epoch, value in histories.get(trial, []):
                per_epoch.setdefault(epoch, []).append(value)
        if not per_epoch:
            continue
        epochs = sorted(per_epoch)
        summary = [seed_stats(per_epoch[e]) for e in epochs]
        line, = ax.plot(epochs, [s.mean for s in summary], marker="o", label=f"{config} (n={len(trials)})")
        ax.fill_between(epochs, [s.ci_low for s in summary], [s.ci_high for s in summary],
                        color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{metric} (mean over seeds, 95 % CI)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, title="config", title_fontsize=7)
    _save(fig, path)


def best_so_far_vs_compute(metric_points: list[tuple[int, float]], compute_points: list[tuple[int, float]],
                           mode: str) -> list[tuple[float, float]]:
    """(cumulative training MACs, best metric so far) at every epoch that logged both, in epoch order."""
    compute = dict(compute_points)
    points, best = [], None
    for epoch, value in sorted(metric_points):
        if not math.isfinite(value):
            continue
        best = value if best is None else (max if mode == "max" else min)(best, value)
        if compute.get(epoch, 0) > 0:
            points.append((compute[epoch], best))
    return points


def render_metric_vs_compute(histories: History, compute: History, configs: dict[str, list[str]], metric: str,
                             mode: str, path: Path) -> None:
    """Each trial's best-so-far ``metric`` against its cumulative training MACs (log axis), so that
    architectures are compared at an equal budget. Trials without compute metrics are left out; with
    repeats, the seeds of a config share a colour.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colour_of = {t: f"C{i % 10}" for i, trials in enumerate(configs.values()) for t in trials}
    labelled: set[str] = set()
    spent: list[float] = []
    for i, (trial, points) in enumerate(sorted(compute.items())):
        curve = best_so_far_vs_compute(histories.get(trial, []), points, mode)
        if not curve:
            continue
        spent += [macs for macs, _ in curve]
        group = next((c for c, trials in configs.items() if trial in trials), trial)
        label = None if group in labelled else group
        labelled.add(group)
        ax.plot(*zip(*curve, strict=True), drawstyle="steps-post", marker="o", ms=3,
                color=colour_of.get(trial, f"C{i % 10}"), label=label)
    ax.set_xscale("log")
    if spent:
        readable_log_axis(ax.xaxis, min(spent), max(spent))
    ax.set_xlabel("training compute (cumulative multiply-accumulates)")
    ax.set_ylabel(f"best {metric} so far")
    ax.grid(alpha=0.3, which="both")
    if labelled:
        ax.legend(fontsize=7, title="config" if configs else "trial", title_fontsize=7)
    _save(fig, path)


def _end_labels(lo: float, hi: float) -> list[str]:
    """Labels of an axis' two ends with three significant digits, or as many more as it takes to tell them
    apart (PSNRs of 24.60 and 24.64 dB would both read 24.6)."""
    for digits in range(3, 10):
        labels = [f"{lo:.{digits}g}", f"{hi:.{digits}g}"]
        if labels[0] != labels[1]:
            break
    return labels


def _as_axis(values: pd.Series, log: bool = False) -> tuple[list[float], list[float], list[str], bool]:
    """One hyperparameter as a parallel-coordinates axis: positions in [0, 1], tick positions and labels.

    Numbers are placed linearly, or by their logarithm when ``log`` (the search space samples them on a log
    scale) and all are positive; anything else is categorical, evenly spaced in sorted order. Whether an
    axis is logarithmic comes from the search space, never from the values' spread: the same sweep file
    gives the same axes in every report, however its samples happened to fall.

    Returns:
        ``(positions, tick_positions, tick_labels, log_scale)``.
    """
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        lo, hi = float(numbers.min()), float(numbers.max())
        log = log and lo > 0
        scaled = numbers.map(math.log10) if log else numbers
        s_lo, s_hi = float(scaled.min()), float(scaled.max())
        span = (s_hi - s_lo) or 1.0
        positions = [(float(v) - s_lo) / span if s_hi > s_lo else 0.5 for v in scaled]
        return positions, [0.0, 1.0] if s_hi > s_lo else [0.5], \
            _end_labels(lo, hi) if s_hi > s_lo else [f"{lo:.3g}"], log
    # str() of each value: pandas 3 keeps missing values missing through astype(str).
    levels = sorted({str(v) for v in values})
    spots = {v: (i / (len(levels) - 1) if len(levels) > 1 else 0.5) for i, v in enumerate(levels)}
    return [spots[str(v)] for v in values], list(spots.values()), levels, False


def render_parallel_coordinates(table: pd.DataFrame, hyperparameters: list[str], metric_column: str,
                                mode: str, path: Path, log_scaled: Collection[str] = ()) -> None:
    """Write :func:`parallel_coordinates_figure` to ``path``."""
    _save(parallel_coordinates_figure(table, hyperparameters, metric_column, mode, log_scaled), path)


def parallel_coordinates_figure(table: pd.DataFrame, hyperparameters: list[str], metric_column: str,
                                mode: str, log_scaled: Collection[str] = ()) -> Figure:
    """One polyline per trial across the sampled hyperparameters and the metric, coloured by the metric.

    Args:
        table: the leaderboard.
        hyperparameters: leaderboard columns holding sampled values (the sweep's search-space keys).
        metric_column: the column with each trial's best metric value.
        mode: "max" or "min"; the colour map runs so that the best trials are always the brightest.
        log_scaled: the hyperparameters sampled on a log scale (``loguniform``, ``qloguniform``): their
            axis is logarithmic and its name says "(log)"; every other axis is linear or categorical.
    """
    axes_names = [h for h in hyperparameters if h in table.columns] + [metric_column]
    columns = [_as_axis(table[name], name in log_scaled) for name in axes_names]
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
    return fig


def render_pareto(table: pd.DataFrame, metric_column: str, mode: str, path: Path) -> None:
    """Write :func:`pareto_figure` to ``path``."""
    _save(pareto_figure(table, metric_column, mode), path)


def pareto_figure(table: pd.DataFrame, metric_column: str, mode: str) -> Figure:
    """The metric against each cost (MACs per pixel, parameters, latency), the Pareto front drawn as steps.

    Each point is labelled with its trial. The legend sits below the panels, outside every plotting area,
    so it can never cover a point or a label. A cost spanning more than a decade is drawn on a log axis
    with short tick labels (:func:`readable_log_axis`).
    """
    axes_names = cost_axes(table)
    if not axes_names:
        raise ValueError("the leaderboard has no cost column with values (MACs/px, params, latency ms)")
    # Constrained layout keeps room for a legend placed "outside" the panels (and for the suptitle).
    fig = Figure(figsize=(4.2 * len(axes_names), 4.1), layout="constrained")
    axes = fig.subplots(1, len(axes_names), squeeze=False)
    values = pd.to_numeric(table[metric_column], errors="coerce").tolist()
    front_line = None
    for ax, name in zip(axes[0], axes_names, strict=True):
        costs = pd.to_numeric(table[name], errors="coerce").tolist()
        front = pareto_front(costs, values, mode)
        ax.scatter(costs, values, c=["tab:red" if f else "tab:grey" for f in front], zorder=3)
        for cost, value, trial in zip(costs, values, table["trial"], strict=True):
            ax.annotate(str(trial)[-5:], (cost, value), xytext=(3, 3), textcoords="offset points", fontsize=6)
        on_front = sorted((c, v) for c, v, f in zip(costs, values, front, strict=True) if f)
        if on_front:
            front_line, = ax.step(*zip(*on_front, strict=True), where="post", color="tab:red", lw=1.2)
        known = [c for c in costs if math.isfinite(c)]
        if known and min(known) > 0 and max(known) / min(known) > 10:
            ax.set_xscale("log")
            readable_log_axis(ax.xaxis, min(known), max(known))
        ax.set_xlabel(name)
        ax.set_ylabel(metric_column)
        ax.grid(alpha=0.3)
    if front_line is not None:
        fig.legend([front_line], ["Pareto front"], loc="outside lower center", fontsize=7, frameon=False)
    fig.suptitle(f"{metric_column} ({mode}) vs cost")
    return fig
