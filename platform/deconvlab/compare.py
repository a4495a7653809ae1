"""``deconvlab compare``: two models scored on the same items, paired.

Both models (``models:/``, ``runs:/`` or a local ``.ckpt``) must be of one task family. They are evaluated
on model A's data config (with the data overrides given), each with its task's per-item results
(:func:`deconvlab.evaluate.item_results`); item ids pair them. On the chosen metric (default: A's task
monitor) the paired differences A - B give:

- the mean difference and its 95 % confidence interval from a paired bootstrap (whole items resampled with
  replacement, ``N_RESAMPLES`` resamples, seeded; percentile interval, ``scipy.stats.bootstrap``);
- wins, ties and losses of A (a tie: the two values differ by at most ``TIE_TOLERANCE`` relative);
- a p-value from the two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, ties dropped, exact
  for small samples without tied ranks).

The verdict names a winner only when the interval excludes 0. Logged (unless ``log=False``) as a run of the
``comparisons`` experiment, tagged with both URIs, with the per-item table and a plot. Everything a user can
get wrong (an unknown metric, models of different families) is refused before that run opens.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from scipy import stats

from deconvlab import tracking
from deconvlab.build import build_datamodule
from deconvlab.errors import UserError
from deconvlab.evaluate import evaluation_data, item_results, run_validation, write_items
from deconvlab.model_io import LoadedModel, load_model

COMPARISON_EXPERIMENT = "comparisons"
N_RESAMPLES = 10_000
SEED = 0
CONFIDENCE = 0.95
# Relative: |a - b| <= TIE_TOLERANCE * max(|a|, |b|) is a tie (float noise, or a metric of the data alone
# such as val/psnr_input, which is the same for both models).
TIE_TOLERANCE = 1e-9
# Below this many items a percentile bootstrap interval is too narrow (with 2 items it is about [min, max] of
# the two differences): a verdict from it says so.
FEW_ITEMS = 10
TEST_NAME = "two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon, ties dropped)"
CI_NAME = f"paired bootstrap, percentile, {N_RESAMPLES} resamples, seed {SEED}"
# Name parts of metrics where lower is better: losses, errors, distances, counts of failures.
LOWER_IS_BETTER = ("loss", "mse", "mae", "error", "hd95", "hausdorff", "distance", "missed", "spurious")


def higher_is_better(metric: str, monitor: str, monitor_mode: str) -> bool:
    """Whether a larger value of ``metric`` is better.

    The task's monitor says so itself (its ``monitor_mode``). Any other metric is lower-is-better when its
    name (after the last ``/``) contains one of ``LOWER_IS_BETTER`` (a loss, MSE, an error, a surface
    distance such as HD95, a count of missed or spurious regions); every other metric (PSNR, SSIM, Dice,
    IoU, accuracy, sensitivity) is higher-is-better.
    """
    if metric == monitor:
        return monitor_mode == "max"
    name = metric.rsplit("/", 1)[-1].lower()
    return not any(part in name for part in LOWER_IS_BETTER)


@dataclass
class PairedStatistics:
    """Paired comparison of A and B on one metric; differences are A - B in the metric's units."""

    mean_a: float
    mean_b: float
    mean_difference: float
    ci_low: float
    ci_high: float
    n_items: int
    wins: int
    ties: int
    losses: int
    p_value: float


def tied(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Which pairs are ties: equal up to ``TIE_TOLERANCE`` relative."""
    return np.abs(a - b) <= TIE_TOLERANCE * np.maximum(np.abs(a), np.abs(b))


def outcomes(a: np.ndarray, b: np.ndarray, higher: bool = True) -> tuple[int, int, int]:
    """Wins, ties and losses of A against B, item by item."""
    tie = tied(a, b)
    a_better = (a > b) if higher else (a < b)
    return int((a_better & ~tie).sum()), int(tie.sum()), int((~a_better & ~tie).sum())


def bootstrap_ci(differences: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean paired difference: items (pairs) resampled with replacement.

    Fewer than 2 items give no interval (NaN); identical differences give a zero-width one.
    """
    d = np.asarray(differences, float)
    if d.size < 2:
        return math.nan, math.nan
    if np.ptp(d) == 0:
        return float(d[0]), float(d[0])
    result = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                             method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_p(differences: np.ndarray, ties: np.ndarray | None = None) -> float:
    """Two-sided Wilcoxon signed-rank p-value of the differences; tied pairs are dropped (1.0 if all are)."""
    d = np.asarray(differences, float)
    d = d[~ties] if ties is not None else d[d != 0]
    if d.size == 0:
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_statistics(a: Sequence[float], b: Sequence[float], higher: bool = True,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED) -> PairedStatistics:
    """Mean difference A - B with its bootstrap interval, wins/ties/losses of A and the Wilcoxon p-value.

    Args:
        a, b: the metric per item, paired by position.
        higher: whether a larger value is better (see :func:`higher_is_better`); sets wins and losses.
        n_resamples, seed: the bootstrap's.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired values need two equally long non-empty lists, got {a.shape} and {b.shape}")
    d = a - b
    low, high = bootstrap_ci(d, n_resamples, seed)
    wins, ties, losses = outcomes(a, b, higher)
    return PairedStatistics(float(a.mean()), float(b.mean()), float(d.mean()), low, high, int(a.size), wins,
                            ties, losses, wilcoxon_p(d, tied(a, b)))


@dataclass
class Comparison:
    """Two models on the same items: the per-item table, the statistics and where they were logged."""

    uri_a: str
    uri_b: str
    metric: str
    family: str
    higher_is_better: bool
    statistics: PairedStatistics
    items: list[dict[str, Any]]
    data: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    n_without_value: int = 0
    run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                  for k, v in asdict(self.statistics).items()}
        return {"metric": self.metric, "model_a": self.uri_a, "model_b": self.uri_b, **finite,
                "n_without_value": self.n_without_value, "higher_is_better": self.higher_is_better,
                "family": self.family,
                "split": self.data.get("split"), "data_root": self.data.get("root"), "overrides": self.overrides,
                "confidence": CONFIDENCE, "ci_method": CI_NAME, "test": TEST_NAME,
                "verdict": verdict(self), "comparison_run_id": self.run_id}


def _unit(metric: str) -> str:
    return " dB" if "psnr" in metric.rsplit("/", 1)[-1] else ""


def verdict(comparison: Comparison) -> str:
    """One line: who beats whom on the metric, by how much, with the interval and the item counts."""
    s, metric, unit = comparison.statistics, comparison.metric, _unit(comparison.metric)
    things = "cases" if comparison.family == "volumetric" else "images"
    tail = f"{s.n_items} {things}"
    if not (s.ci_low > 0 or s.ci_high < 0):  # NaN (fewer than 2 items) included
        return (f"A and B are not distinguishable on {metric}: A - B = {s.mean_difference:+.4g}{unit} "
                f"[{s.ci_low:.4g}, {s.ci_high:.4g}], {tail}, {s.wins} wins, {s.ties} ties, {s.losses} losses "
                f"for A (Wilcoxon p = {s.p_value:.2g})")
    a_wins = (s.ci_low > 0) == comparison.higher_is_better
    # The winner's advantage is positive: A - B when A wins on a higher-is-better metric, else flipped.
    sign = 1 if (s.ci_low > 0) else -1
    low, high = sorted((sign * s.ci_low, sign * s.ci_high))
    winner, loser, wins = ("A", "B", s.wins) if a_wins else ("B", "A", s.losses)
    better = "" if comparison.higher_is_better else " lower"
    caveat = f"; under {FEW_ITEMS} {things}, the interval is optimistic" if s.n_items < FEW_ITEMS else ""
    return (f"{winner} beats {loser} on {metric} by {abs(s.mean_difference):.4g}{unit}{better} "
            f"[{low:.4g}, {high:.4g}], {tail}, {wins} wins, {s.ties} ties (Wilcoxon p = {s.p_value:.2g}{caveat})")


def _item_values(loaded: LoadedModel, data: dict[str, Any], metric: str, chosen: bool = True) -> dict[str, float]:
    """``item -> metric`` for one model on ``data`` (items keyed by position when their ids repeat).

    Raises:
        UserError: ``metric`` is not among the task's per-item metrics (listing them).
    """
    datamodule = build_datamodule(data, "validate", "the comparison data")
    run_validation(loaded, datamodule, record_items=True)
    rows, _ = item_results(loaded.task)
    available = sorted(dict.fromkeys(k for row in rows for k in row if k != "item"))
    if metric not in available:
        what = f"unknown metric {metric!r}" if chosen else f"the task monitor {metric} has no per-item values"
        raise UserError(f"{what} for a {loaded.family} model", "--metric",
                        f"choose one of the per-item metrics: {', '.join(available)}")
    ids = [str(row["item"]) for row in rows]
    if len(set(ids)) < len(ids):
        ids = [f"{index:05d}" for index in range(len(rows))]
    return {item: float(row[metric]) for item, row in zip(ids, rows, strict=True)}


def _data_for(loaded: LoadedModel, data: dict[str, Any]) -> dict[str, Any]:
    """A's data for model ``loaded``: a data module that cuts inputs for the model (``layout_of``) cuts
    them for this model's own layout; the items are the same."""
    if "layout_of" not in data:
        return data
    return {**data, "layout_of": OmegaConf.to_container(loaded.cfg.model, resolve=True)}


def _check_family(a: LoadedModel, b: LoadedModel) -> None:
    if a.family != b.family:
        raise UserError(f"A is a {a.family} model and B a {b.family} model: they score different things",
                        f"{a.uri} vs {b.uri}", "compare two models of the same task family")


def compare(uri_a: str, uri_b: str, overrides: Sequence[str] = (), metric: str | None = None,
            tracking_uri: str | None = None, trust: bool = False, log: bool = True,
            config_a: str | Path | None = None, config_b: str | Path | None = None) -> Comparison:
    """Evaluate A and B on the same items and compare them item by item (see the module docstring).

    Args:
        uri_a, uri_b: model URIs (``models:/...``, ``runs:/RUN_ID``) or ``.ckpt`` files.
        overrides: data overrides applied to A's data config; both models are scored on the result.
        metric: a per-item metric key (default: A's task monitor, e.g. ``val/psnr``).
        tracking_uri: the MLflow store (default: ``MLFLOW_TRACKING_URI`` or ./mlflow.db).
        trust: allow unpickling (see :func:`deconvlab.model_io.load_model`).
        log: log a run in the ``comparisons`` experiment.
        config_a, config_b: the config of a ``.ckpt`` A or B when none is found beside it.

    Raises:
        UserError: models of different task families, an unknown metric, any bad URI or data override.
    """
    overrides = list(overrides)
    a = load_model(uri_a, tracking_uri, trust, config_a)
    b = load_model(uri_b, tracking_uri, trust, config_b)
    _check_family(a, b)
    data = evaluation_data(a.cfg, overrides)
    chosen, metric = metric is not None, metric or a.task.monitor
    values_a = _item_values(a, data, metric, chosen)
    values_b = _item_values(b, _data_for(b, data), metric)
    if set(values_a) != set(values_b):
        raise RuntimeError(f"A and B were scored on different items: {sorted(set(values_a) ^ set(values_b))[:5]}")
    # An item without a value (NaN, e.g. a region absent from the case) pairs with nothing.
    items = [i for i in values_a if math.isfinite(values_a[i]) and math.isfinite(values_b[i])]
    if not items:
        raise UserError(f"no item has a value of {metric} for both models", "--metric",
                        "choose a metric the items have (see deconvlab evaluate --per-item)")
    higher = higher_is_better(metric, a.task.monitor, a.task.monitor_mode)
    statistics = paired_statistics([values_a[i] for i in items], [values_b[i] for i in items], higher)
    table = [{"item": i, "a": values_a[i], "b": values_b[i], "difference": values_a[i] - values_b[i]}
             for i in items]
    comparison = Comparison(uri_a, uri_b, metric, a.family, higher, statistics, table, data, overrides,
                            n_without_value=len(values_a) - len(items))
    if log:
        comparison.run_id = _log(comparison, tracking_uri)
    return comparison


def render_plot(comparison: Comparison, path: Path) -> Path:
    """Paired scatter (B against A, one dot per item, the diagonal = equal) beside the histogram of A - B
    with its mean and bootstrap interval."""
    a = np.array([row["a"] for row in comparison.items])
    b = np.array([row["b"] for row in comparison.items])
    s, metric = comparison.statistics, comparison.metric
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    scatter, histogram = fig.subplots(1, 2)
    scatter.scatter(b, a, s=18)
    low, high = float(min(a.min(), b.min())), float(max(a.max(), b.max()))
    scatter.plot([low, high], [low, high], color="grey", linewidth=1)
    scatter.set(xlabel=f"B {metric}", ylabel=f"A {metric}", title="one dot per item (above the line: A higher)")
    if math.isfinite(s.ci_low):
        histogram.axvspan(s.ci_low, s.ci_high, alpha=0.25, color="tab:orange", label="95 % bootstrap CI")
    histogram.hist(a - b, bins=min(30, max(5, len(a) // 2)), alpha=0.8)
    histogram.axvline(0, color="grey", linewidth=1)
    histogram.axvline(s.mean_difference, color="black", label=f"mean {s.mean_difference:.4g}")
    histogram.set(xlabel=f"A - B ({metric})", ylabel="items", title="paired differences")
    histogram.legend(fontsize=8)
    a_name, b_name = (uri if len(uri) <= 60 else f"...{uri[-57:]}" for uri in (comparison.uri_a, comparison.uri_b))
    fig.suptitle(f"A = {a_name}   B = {b_name}\n{verdict(comparison)}", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _log(comparison: Comparison, tracking_uri: str | None) -> str:
    uri = tracking.resolve_tracking_uri(tracking_uri)
    tags = {"deconvlab.role": "comparison", "deconvlab.model_uri_a": comparison.uri_a,
            "deconvlab.model_uri_b": comparison.uri_b, "deconvlab.metric": comparison.metric,
            "deconvlab.verdict": verdict(comparison)[:5000]}
    run_name = f"compare {comparison.metric} {time.strftime('%Y%m%d-%H%M%S')}"
    s = comparison.statistics
    with tracking.tracked_run(COMPARISON_EXPERIMENT, run_name, uri, tags) as (client, run_id):
        tracking.log_params(client, run_id, {**tracking.flatten(comparison.data, "data."),
                                             "compare.metric": comparison.metric,
                                             "compare.overrides": " ".join(comparison.overrides),
                                             "compare.higher_is_better": str(comparison.higher_is_better),
                                             "compare.ci": CI_NAME, "compare.test": TEST_NAME})
        for key, value in asdict(s).items():
            if math.isfinite(value):
                client.log_metric(run_id, key, float(value))
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            write_items(comparison.items, folder / "per_item.csv")
            render_plot(comparison, folder / "paired.png")
            (folder / "comparison.json").write_text(json.dumps(comparison.to_dict() | {"comparison_run_id": run_id},
                                                               indent=2))
            client.log_artifacts(run_id, scratch)
    return run_id


def format_comparison(comparison: Comparison) -> list[str]:
    """The two models, the data, the verdict line, and where it was logged."""
    s = comparison.statistics
    lines = [f"A: {comparison.uri_a}", f"B: {comparison.uri_b}",
             f"on split {comparison.data.get('split')} (root={comparison.data.get('root')}), {s.n_items} items; "
             f"mean {comparison.metric}: A {s.mean_a:.6g}, B {s.mean_b:.6g}", verdict(comparison)]
    if comparison.n_without_value:
        lines.insert(-1, f"{comparison.n_without_value} items without a value of {comparison.metric} left out")
    if comparison.run_id:
        lines.append(f"logged as run {comparison.run_id} in experiment {COMPARISON_EXPERIMENT}")
    return lines
