"""The sweep's leaderboard as data, read back from MLflow, ranked by the sweep's metric.

:func:`build_trials` reads one row per trial: the trial, its config id, status and epochs, its best metric,
its cost (parameters, MACs per pixel, latency), its sampled hyperparameters and its MLflow run.
:func:`build_leaderboard` makes the leaderboard every view of a sweep (:mod:`.views`, :mod:`.plots`,
:mod:`.report`) is drawn from: those rows plus ``n``, or, for a sweep with ``repeats: N``, one row per config
with the statistics over its seeds (:func:`seed_stats`, :func:`tied_with_best`). Which trials are
Pareto-optimal is computed here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from deconvlab.sweep.records import (
    CONFIG_TAG,
    COST_COLUMNS,
    EPOCHS_TAG,
    STOP_REASON_TAG,
    TRIAL_TAG,
    DriverLog,
    child_runs,
)

# Measures the cost of trial runs by id: run id -> an object with ``as_metrics()`` (``cost/*`` keys), or None
# where it could not be measured (:func:`deconvlab.cost.trial_costs` with ``log=False``).
CostMeasurer = Callable[[MlflowClient, list[str]], dict[str, Any]]

# Leaderboard columns that are costs, in the order the Pareto plot shows them.
COST_AXES = ("MACs/px", "params", "latency ms")
# A config's confidence interval of the mean, and the level of the test that ties a config with the best.
CI_LEVEL = 0.95
TIE_ALPHA = 0.05
# What a config's row adds: its statistics over seeds (mean, std, n, CI of the mean, tie with the best).
STAT_COLUMNS = ("n", "mean", "std", "ci_low", "ci_high", "tied_with_best")


def _status(run) -> str:
    reason = run.data.tags.get(STOP_REASON_TAG, "")
    return "early stopped" if reason.startswith("stopped early") else run.info.status.lower()


def build_trials(client: MlflowClient, experiment_id: str, parent_run_id: str, metric: str,
                 mode: str, runs: list | None = None) -> pd.DataFrame:
    """Rows of (rank, trial, config, status, epochs, best metric, cost, sampled hyperparameters, MLflow run).

    ``config`` is the trial's ``deconvlab.config_id`` tag (its trial id for runs without one); a sweep with
    repeats has its ``seed`` among the sampled values. ``runs``: the sweep's child runs when the caller has
    just read them (a search over every trial, not done twice).
    """
    rows = []
    for run in runs if runs is not None else child_runs(client, experiment_id, parent_run_id):
        trial = run.data.tags.get(TRIAL_TAG, "")
        rows.append({
            "trial": trial,
            "config": run.data.tags.get(CONFIG_TAG, trial),
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


@dataclass(frozen=True)
class SeedStats:
    """A config's metric over its seeds: count, mean, sample standard deviation, CI of the mean."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def _finite(values: Iterable[float]) -> np.ndarray:
    numbers = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(float)
    return numbers[np.isfinite(numbers)]


def seed_stats(values: Iterable[float], level: float = CI_LEVEL) -> SeedStats:
    """Mean, standard deviation (n - 1) and the Student t interval of the mean over a config's seeds.

    The interval is ``mean -/+ t(1 - (1 - level) / 2, n - 1) * std / sqrt(n)``. Seeds without a value (NaN:
    a trial that never validated) are left out of ``n``. With one value, ``std`` and the interval are NaN:
    one seed says nothing about the spread.
    """
    finite = _finite(values)
    n = len(finite)
    if n == 0:
        return SeedStats(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(finite.mean())
    if n == 1:
        return SeedStats(1, mean, math.nan, math.nan, math.nan)
    std = float(finite.std(ddof=1))
    from scipy import stats  # only sweeps with repeats get here: importing scipy.stats costs ~0.5 s

    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return SeedStats(n, mean, std, mean - half, mean + half)


def worse_than_best(best: Iterable[float], other: Iterable[float], mode: str, alpha: float = TIE_ALPHA) -> bool:
    """Whether ``other``'s seeds are distinguishably worse than ``best``'s.

    Welch's t-test (unequal variances), one-sided in the metric's direction (H1: ``best``'s mean is higher
    for ``mode="max"``, lower for ``"min"``), at level ``alpha``. With fewer than two values on either side
    there is no spread to test against: not distinguishable. With no spread on both sides (deterministic
    trials) any difference in the right direction is distinguishable.
    """
    a, b = _finite(best), _finite(other)
    if len(a) < 2 or len(b) < 2:
        return False
    sign = 1.0 if mode == "max" else -1.0
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return bool(sign * (a.mean() - b.mean()) > 0)
    from scipy import stats  # only sweeps with repeats get here: importing scipy.stats costs ~0.5 s

    test = stats.ttest_ind(a, b, equal_var=False, alternative="greater" if mode == "max" else "less")
    return bool(test.pvalue < alpha)


def tied_with_best(groups: list[list[float]], mode: str, alpha: float = TIE_ALPHA) -> list[bool]:
    """For each config's seed values: True when it is not distinguishable from the config with the best mean.

    The best config is tied with itself; a config without a value never is; any other is tied unless
    :func:`worse_than_best` (Welch's one-sided t-test at ``alpha``) tells it apart from the best.
    """
    means = [seed_stats(g).mean for g in groups]
    finite = [i for i, m in enumerate(means) if math.isfinite(m)]
    if not finite:
        return [False] * len(groups)
    best = (max if mode == "max" else min)(finite, key=lambda i: means[i])
    return [i == best or (i in finite and not worse_than_best(groups[best], groups[i], mode, alpha))
            for i in range(len(groups))]


def build_leaderboard(trials: pd.DataFrame, metric: str, mode: str, repeats: int = 1) -> pd.DataFrame:
    """The leaderboard: the trial rows with ``n``, or with repeats one row per config, ranked by mean.

    Args:
        trials: :func:`build_trials` (with costs, :func:`with_costs`).
        metric, mode: what the sweep ranks by; ``best <metric>`` is each trial's value.
        repeats: the sweep's seeds per config. 1: the trial rows as they are plus ``n`` (1, or 0 for a trial
            without a value). More: :func:`group_by_config`.
    """
    if repeats > 1 and len(trials):
        return group_by_config(trials, metric, mode)
    column = f"best {metric}"
    table = trials.drop(columns=["config"], errors="ignore")
    if len(table):
        table.insert(table.columns.get_loc(column) + 1, "n", table[column].notna().astype(int))
    return table


def group_by_config(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """One row per config: its statistics over seeds, its best seed's trial and run, its values and costs.

    Columns: rank, config, ``n``, ``mean``, ``std``, ``ci_low``, ``ci_high`` (:func:`seed_stats` of the
    seeds' ``best <metric>``), ``tied_with_best`` (:func:`tied_with_best`), ``seeds`` and ``epochs`` (per
    seed, in seed order), then the best seed's trial, value, status, cost, hyperparameters and MLflow run
    (the seed ``deconvlab promote`` registers). Ranked by mean, configs without a value last.
    """
    column = f"best {metric}"
    rows, values = [], []
    for config, group in trials.groupby("config", sort=False):
        if "seed" in group.columns:
            group = group.iloc[pd.to_numeric(group["seed"], errors="coerce").argsort(kind="stable")]
        best = group.sort_values(column, ascending=(mode == "min"), na_position="last").iloc[0]
        s = seed_stats(group[column])
        values.append(group[column].tolist())
        rows.append({**best.to_dict(), "config": config, "n": s.n, "mean": s.mean, "std": s.std,
                     "ci_low": s.ci_low, "ci_high": s.ci_high,
                     "seeds": " ".join(map(str, group["seed"])) if "seed" in group.columns else "",
                     "epochs": " ".join(map(str, group["epochs"])),
                     "status": ", ".join(dict.fromkeys(group["status"]))})
    table = pd.DataFrame(rows)
    table["tied_with_best"] = tied_with_best(values, mode)
    first = ["config", *STAT_COLUMNS, "seeds", "trial", column, "status", "epochs"]
    rest = [c for c in table.columns if c not in (*first, "rank", "seed")]
    table = table[first + rest].sort_values("mean", ascending=(mode == "min"), na_position="last")
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


def with_costs(client: MlflowClient, table: pd.DataFrame, measure: CostMeasurer | None,
               known: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The table with cost columns: from ``known`` (run id -> cost, the end of a sweep that measured them
    while their writes are under way) when given; else as they are when logged; for a sweep that ran before
    the driver logged costs, measured now by ``measure`` (not logged), or left out when ``measure`` is None."""
    if len(table) == 0:
        return table
    if known is None:
        if "MACs/px" in table.columns or measure is None:
            return table
        known = measure(client, list(table["mlflow_run"]))
    table = table.copy()
    for key, column in COST_COLUMNS.items():
        table[column] = [c.as_metrics()[key] if c is not None else float("nan")
                         for c in (known.get(r) for r in table["mlflow_run"])]
    return order_cost_columns(table)


def metric_histories(client: MlflowClient, table: pd.DataFrame, metric: str,
                     logged: DriverLog | None = None) -> dict[str, list[tuple[int, float]]]:
    """(epoch, value) of ``metric`` for every trial of the leaderboard: from ``logged`` (what the sweep's
    driver wrote) where it knows the trial's run, else read from the store, a round trip per trial."""
    histories = {}
    for row in table.itertuples():
        known = logged.history(row.mlflow_run, metric) if logged is not None else None
        histories[row.trial] = known if known is not None else \
            [(m.step, m.value) for m in client.get_metric_history(row.mlflow_run, metric)]
    return histories


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
